"""Box fitting (engines/box_fitting.py): the latent update lowers the layout energy, it runs on every scheduler and
on SDXL's extra conditioning, it leaves everything restored, and on the demo model it draws objects at their boxes'
size instead of the model's habitual size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engines.box_fitting import BoxFitter, layout_energy
from engines.generate import Generator
from engines.layout import build_maps
from engines.models import DEMO_MODEL_DIR
from engines.prompt_subjects import PromptSubjects
from engines.types import (
    BOX_FITS,
    GUIDANCE_MODES,
    GenerateRequest,
    GuidanceConfig,
    InputError,
    Layout,
    Region,
    with_default_fit,
)

PROMPT = "a photo of dog and cat on the beach"
LAYOUT = Layout((Region("dog", (0.0, 0.0, 1 / 3, 1.0)), Region("cat", (0.5, 0.25, 1.0, 0.75), layer=1)))


def energy_with_all_attention_on(cell: int, box: tuple[float, float, float, float], side: int = 4) -> float:
    """E for one region whose one token (position 1) is attended only at `cell` of a side × side grid."""
    maps = build_maps(Layout((Region("dog", box),)), [(1,)], 3, (side, side), 1, GuidanceConfig())[side * side]
    probabilities = torch.zeros(1, side * side, 3)
    probabilities[0, :, 0] = 1.0  # every other cell attends to the start token
    probabilities[0, cell] = torch.tensor([0.0, 1.0, 0.0])
    return float(layout_energy([(probabilities, maps)], [(1,)]))


def test_the_energy_counts_a_cell_by_the_area_its_box_covers():
    box = (0.0, 0.0, 0.375, 1.0)  # column 0 of 4 and half of column 1
    assert energy_with_all_attention_on(0, box) == 0.0  # a fully covered cell
    assert energy_with_all_attention_on(1, box) == pytest.approx(0.25)  # a half-covered one counts half: (1 − ½)²
    assert energy_with_all_attention_on(2, box) == 1.0  # outside
    tiny = (0.3, 0.3, 0.4, 0.4)  # a box inside one cell (5): that cell is the best it can do, so E can reach 0
    assert energy_with_all_attention_on(5, tiny) == 0.0 and energy_with_all_attention_on(6, tiny) == 1.0


def one_fit(bundle, guidance: GuidanceConfig) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(E before, E after, latents before, latents after) for one fitted step at t = 801."""
    generator = Generator(bundle)
    request = GenerateRequest(PROMPT, layout=LAYOUT, seed=0, steps=4, cfg=1.0, guidance=guidance)
    width, height = generator.image_size(request)
    prepared = generator.prepare_prompt(request, PromptSubjects())
    unet, scheduler = bundle.pipe.unet, bundle.pipe.scheduler
    factor = bundle.pipe.vae_scale_factor
    latents = torch.randn(
        1, unet.config.in_channels, height // factor, width // factor, generator=torch.Generator().manual_seed(0)
    )
    conditioning = {"encoder_hidden_states": prepared.embeds["prompt_embeds"]}
    timestep = torch.tensor(801)
    with generator._layout_guidance(request, prepared.parsed, width, height) as state:

        def energy(x: torch.Tensor) -> float:
            with torch.no_grad(), state.record.capture() as recorded:
                unet(x, timestep, **conditioning)
            return float(layout_energy(recorded, prepared.parsed.region_positions))

        fitter = BoxFitter(unet, state, prepared.parsed.region_positions, guidance)
        fitted = fitter(scheduler, latents, timestep, conditioning)
        return energy(latents), energy(fitted), latents, fitted


def test_fitting_lowers_the_energy_of_attention_outside_the_boxes(sd15):
    before, after, _, _ = one_fit(sd15, GuidanceConfig(fit_scale=3000.0).fitted())
    assert after < before - 1e-4


def test_fitting_moves_the_latent_but_keeps_its_norm(sd15):
    """A latent grown past its noise level's norm is one the UNet never saw: shapes bend, or the image is noise."""
    _, _, latents, fitted = one_fit(sd15, GuidanceConfig(fit_scale=3000.0).fitted())
    assert (fitted - latents).norm() > 0.1 * latents.norm()
    assert fitted.norm() == pytest.approx(float(latents.norm()), rel=1e-5)


def test_fitting_with_scale_zero_leaves_the_latent_alone(sd15):
    before, after, latents, fitted = one_fit(sd15, GuidanceConfig(fit_scale=0.0).fitted())
    assert after == pytest.approx(before, abs=1e-6)
    assert torch.allclose(fitted, latents, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_fitting_runs_on_sdxl_with_every_kind_of_scheduler_and_restores_processors(sdxl, scheduler):
    before = {name: type(p) for name, p in sdxl.pipe.unet.attn_processors.items()}
    guidance = GuidanceConfig().fitted()
    request = GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=4, scheduler=scheduler, guidance=guidance)
    fitted = np.asarray(Generator(sdxl)(request).images[0], float)
    plain = np.asarray(
        Generator(sdxl)(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=4, scheduler=scheduler)).images[0], float
    )
    assert np.isfinite(fitted).all()
    assert np.abs(fitted - plain).mean() > 0  # the latent was moved
    assert {name: type(p) for name, p in sdxl.pipe.unet.attn_processors.items()} == before
    assert torch.is_grad_enabled()  # fitting switched gradients on only for itself


def test_fitting_works_without_forward_guidance(sd15):
    off = GuidanceConfig.off()
    unguided = np.asarray(
        Generator(sd15)(GenerateRequest(PROMPT, layout=LAYOUT, seed=1, steps=8, guidance=off)).images[0], float
    )
    fitted_only = GenerateRequest(PROMPT, layout=LAYOUT, seed=1, steps=8, guidance=off.fitted())
    fitted = np.asarray(Generator(sd15)(fitted_only).images[0], float)
    assert np.abs(fitted - unguided).mean() > 0


@pytest.mark.parametrize("depth, skipped", [("coarse", "up_blocks"), ("down", "mid_block"), ("crowd", "mid_block")])
def test_shallow_fitting_runs_the_unet_only_as_far_as_it_reads_and_still_lowers_the_energy(sd15, depth, skipped):
    """Coarse fitting stops the UNet after its middle block (no up block runs), down fitting after its last down
    block with cross-attention (not even the middle block runs), crowd with two regions as down; the energy still
    falls."""
    calls = []
    unet = sd15.pipe.unet
    blocks = list(unet.up_blocks) if skipped == "up_blocks" else [unet.mid_block]
    hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in blocks]
    try:
        shallow = dataclasses.replace(GuidanceConfig(fit_scale=3000.0).fitted(), fit_depth=depth)
        before, after, latents, fitted = one_fit(sd15, shallow)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 2 * len(blocks)  # the two energy measurements only: fitting's 3 forwards skipped them
    assert after < before - 1e-4 and (fitted - latents).norm() > 0


def test_a_png_from_before_fit_depth_fits_as_it_did():
    """Old PNGs have no fit_depth: reading them gives the full depth they were made with."""
    saved = GenerateRequest(PROMPT, layout=LAYOUT, guidance=GuidanceConfig().fitted()).to_dict()
    del saved["guidance"]["fit_depth"]
    assert GenerateRequest.from_dict(saved).guidance.fit_depth == "full"
    assert GUIDANCE_MODES["troupe-quick-fit"].config.fit_depth == "crowd"


def test_drawing_boxes_gets_the_familys_fitting_unless_fitting_was_chosen():
    guided = GuidanceConfig()
    assert with_default_fit(guided, LAYOUT, "demo") == guided.with_fit("quick")
    assert with_default_fit(guided, LAYOUT, "sd15") == guided  # SD keeps Cones 2's forward guidance
    assert with_default_fit(guided, Layout(), "demo") == guided  # no boxes: nothing to fit
    assert with_default_fit(GuidanceConfig.off(), LAYOUT, "demo").fit_iterations == 0  # guidance off stays off
    full = guided.with_fit("full")
    assert with_default_fit(full, LAYOUT, "demo") == full  # a chosen fitting is kept
    assert full == guided.fitted()  # --fit-boxes and "full" are one setting: old fitted PNGs reopen as "full"


def test_every_fitting_setting_is_known_by_its_name_and_others_by_none():
    for name in BOX_FITS:
        assert GuidanceConfig(strength=0.2).with_fit(name).fit_name == name
    assert GuidanceConfig(fit_iterations=5).fit_name is None  # settings of one's own (an older image) stay as they are
    with pytest.raises(InputError, match="unknown box fitting 'fast'"):
        GuidanceConfig().with_fit("fast")


@pytest.mark.parametrize(
    "field, value",
    [
        ("fit_iterations", -1),
        ("fit_iterations", 11),
        ("fit_iterations", 1.5),
        ("fit_fraction", 1.5),
        ("fit_scale", -1.0),
        ("fit_scale", float("nan")),
        ("fit_depth", "shallow"),
    ],
)
def test_bad_fitting_settings_are_refused_with_their_name(field, value):
    with pytest.raises(InputError, match="box-fitting|fit_scale|fit_fraction|fit_depth"):
        GuidanceConfig(**{field: value})


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model_index.json").exists(), reason="the demo model is not built")
def test_on_the_demo_model_fitting_draws_a_ball_at_the_size_of_a_small_box():
    """A ball asked into a 16-px box: forward guidance alone draws it about 26 px wide (the model's habit);
    box fitting brings it much closer to the box."""
    from demo_world.detector import detect
    from engines.models import load_model
    from engines.types import ModelSpec

    generator = Generator(load_model(ModelSpec("demo")))

    def mean_error(guidance: GuidanceConfig) -> float:
        errors = []
        for seed, (cx, cy) in enumerate([(0.3, 0.35), (0.7, 0.35), (0.3, 0.65), (0.7, 0.65)]):
            box = (cx - 0.125, cy - 0.125, cx + 0.125, cy + 0.125)  # 16 px
            request = GenerateRequest(
                "a red ball on grass",
                layout=Layout((Region("red ball", box),)),
                seed=seed,
                steps=20,
                cfg=5.0,
                guidance=guidance,
            )
            found = [d for d in detect(generator(request).images[0]) if d.colour == "red"]
            width = max((d.box[2] - d.box[0] for d in found), default=0.0) * 64
            errors.append(abs(width - 16))
        return float(np.mean(errors))

    forward_only, fitted = mean_error(GuidanceConfig()), mean_error(GuidanceConfig().fitted())
    assert fitted < forward_only - 3, (forward_only, fitted)
