"""Reference identity (engines/references.py, kernels/reference_attention.py): instant subjects, routing by region,
bit-identity when it is off, and SynCD's image guidance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engines.library import SubjectLibrary
from engines.prompt_subjects import gather_subjects
from engines.references import ReferencePhoto, cell_readers, encode_references, routing_masks
from engines.register import register_subject
from engines.service import Studio
from engines.types import (
    GenerateRequest,
    GuidanceConfig,
    InputError,
    Layout,
    ModelSpec,
    ReferenceConfig,
    Region,
    RegisterRequest,
)
from tests.tiny_models import subject_photos

PROMPT = "a photo of <rex> and a cat on the beach"
LAYOUT = Layout((Region("", (0.0, 0.2, 0.5, 0.8), subject="rex"), Region("cat", (0.5, 0.2, 1.0, 0.8), layer=1)))


@pytest.fixture(scope="module")
def studio(tiny_sd15_dir, tmp_path_factory) -> Studio:
    folder = tmp_path_factory.mktemp("refs")
    studio = Studio(ModelSpec(str(tiny_sd15_dir)), folder / "library")
    studio.register(RegisterRequest("rex", "dog", tuple(subject_photos(folder, "rex", 1)), preset="instant"))
    return studio


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.int16)


def test_an_instant_subject_keeps_its_photos_and_no_residual(studio):
    info = studio.subjects()[0]
    assert (info.name, info.has_residual, info.steps, len(info.photos)) == ("rex", False, 0, 1)
    with pytest.raises(InputError, match="instant subject"):
        studio.library.residuals("rex")
    studio.library.check_compatible("rex", "sdxl", "another encoder")  # photos fit any model


def test_references_off_or_at_strength_zero_are_bit_identical_to_no_references(studio):
    off = studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=3, references=ReferenceConfig(False)))
    zero = studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=3,
                                           references=ReferenceConfig(strength=0.0)))  # fmt: skip
    on = studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=3))
    assert np.array_equal(pixels(off), pixels(zero))
    assert not np.array_equal(pixels(off), pixels(on))  # on by default: the subject has a photo
    assert on.request.references.enabled is True and off.request.references.enabled is False


def test_a_cell_reads_only_its_own_subjects_photos_and_background_reads_none():
    layout = Layout((Region("", (0.0, 0.0, 0.5, 1.0), subject="a"), Region("", (0.5, 0.0, 1.0, 1.0), subject="b"),
                     Region("tent", (0.25, 0.25, 0.75, 0.75), layer=2)))  # fmt: skip
    readers = cell_readers(layout, ["a", "b", "c"], 4, 4).view(4, 4, 3)
    assert readers[0, 0].tolist() == [True, False, False]  # a's region
    assert readers[0, 3].tolist() == [False, True, False]  # b's region
    assert readers[1, 1].tolist() == [False, False, True]  # the tent (a phrase, in front) reads the unplaced c
    alone = cell_readers(Layout((Region("", (0.0, 0.0, 0.5, 1.0), subject="a"),)), ["a"], 4, 4).view(4, 4)
    assert alone[:, :2].all() and not alone[:, 2:].any()  # background reads none


def test_attention_to_another_subjects_photos_is_exactly_zero(sd15):
    photos = [ReferencePhoto("a", "dog", *_square((255, 0, 0))), ReferencePhoto("b", "cat", *_square((0, 0, 255)))]
    refs = encode_references(sd15, photos)
    layout = Layout((Region("", (0.0, 0.0, 0.5, 1.0), subject="a"), Region("", (0.5, 0.0, 1.0, 1.0), subject="b")))
    masks = routing_masks(layout, refs, (8, 8), 2, (8, 8))
    for tokens, allowed in masks.items():
        side = int(tokens**0.5)
        per_ref = allowed.shape[1] // 2
        left = torch.arange(tokens) % side < side // 2  # cells of a's region
        assert not allowed[left][:, per_ref:].any() and not allowed[~left][:, :per_ref].any()
    _the_kernel_gives_them_no_weight(masks[64])


def _the_kernel_gives_them_no_weight(allowed: torch.Tensor) -> None:
    """Through the processor itself: what the forbidden reference tokens carry cannot change a single output."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from kernels.reference_attention import ReferenceAttnProcessor, ReferenceState

    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, processor=AttnProcessor2_0()).eval()
    state = ReferenceState({64: allowed}, rows=1, mode="write")
    processor = ReferenceAttnProcessor(state, AttnProcessor2_0())
    attn.set_processor(processor)
    with torch.no_grad():
        attn(torch.randn(2, allowed.shape[1] // 2, 32))  # the reference pass: two references
        state.mode = "read"
        target = torch.randn(1, 64, 32)
        first = attn(target)
        half = allowed.shape[1] // 2
        processor.stored[:, half:] = 5.0  # the second reference's tokens, which no left cell may read
        second = attn(target)
    left = torch.arange(64) % 8 < 4
    assert torch.equal(first[0, left], second[0, left]) and not torch.equal(first[0, ~left], second[0, ~left])


def _square(colour):
    from PIL import Image, ImageDraw

    photo, mask = Image.new("RGB", (64, 64), (90, 160, 80)), Image.new("L", (64, 64), 0)
    ImageDraw.Draw(photo).rectangle((16, 16, 48, 48), fill=colour)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    return photo, mask


def test_image_guidance_runs_three_branches_and_needs_cfg(studio):
    guided = ReferenceConfig(image_guidance=2.0, image_guidance_growth=1.0)
    result = studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=3, references=guided))
    assert np.isfinite(pixels(result)).all() and result.request.references.image_guidance == 2.0
    with pytest.raises(InputError, match="CFG above 1"):
        studio.generate(GenerateRequest(PROMPT, seed=3, steps=2, cfg=1.0, references=guided))


def test_instant_registration_of_a_photo_of_nothing_writes_nothing(sd15, tmp_path):
    from PIL import Image

    library = SubjectLibrary(tmp_path / "library")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (96, 96), (120, 120, 120)).save(blank)
    with pytest.raises(InputError, match="no subject found"):
        register_subject(sd15, RegisterRequest("ghost", "dog", (str(blank),), preset="instant"), library)
    assert not library.root.exists() or not any(library.root.iterdir())


def test_a_subject_whose_photos_are_gone_still_generates_from_its_residual_and_says_so(sd15, tmp_path):
    library = SubjectLibrary(tmp_path / "library")
    photos = tuple(subject_photos(tmp_path, "bo", 2))
    register_subject(sd15, RegisterRequest("bo", "dog", photos, preset="quick"), library,
                     overrides={"steps": 2, "reg_pool": 16, "delta_sentences": 16})  # fmt: skip
    for photo in library.get("bo").photos:
        (library.folder("bo") / photo.rsplit("/", 1)[-1]).unlink()
    subjects = gather_subjects("a photo of <bo>", library, sd15.family, sd15.fingerprint)
    assert not subjects.photos and "no photos left" in subjects.warnings[0] and "bo" in subjects.residuals


def test_the_collage_puts_each_cut_out_in_its_box_and_the_front_layer_on_top():
    from engines.collage import BACKGROUND, compose_collage

    red, blue = ReferencePhoto("a", "dog", *_square((255, 0, 0))), ReferencePhoto("b", "cat", *_square((0, 0, 255)))
    layout = Layout((Region("", (0.0, 0.0, 0.6, 1.0), subject="a", layer=1),
                     Region("", (0.4, 0.0, 1.0, 1.0), subject="b", layer=0)))  # fmt: skip
    image = np.asarray(compose_collage(layout, [red, blue], 100, 50))
    assert tuple(image[25, 10]) == (255, 0, 0) and tuple(image[25, 90]) == (0, 0, 255)
    assert tuple(image[25, 50]) == (255, 0, 0)  # a is in front where the boxes overlap
    assert tuple(image[25, 2]) == BACKGROUND  # the photo's grass is cut away; the square is centred in a's box
    with pytest.raises(InputError, match="collage start needs"):
        compose_collage(Layout((Region("cat", (0.0, 0.0, 1.0, 1.0)),)), [red], 64, 64)


def test_a_collage_start_denoises_only_the_tail_of_the_trajectory(studio):
    seen = []
    start = ReferenceConfig(start="collage", start_strength=0.5)
    studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=4, references=start),
                    on_progress=lambda p: seen.append((p.step, p.total)))  # fmt: skip
    assert seen[-1] == (2, 2)


@pytest.mark.parametrize("depth", ["crowd", "full"])
def test_box_fitting_that_stops_early_reads_its_attention_while_references_run(studio, depth):
    """The reference pass runs its own UNet forward inside the fitting forward; fitting's early stop (the demo model's
    default "quick" fitting) must not cut it, nor lose the fitting's attention (it raised "stack expects a non-empty
    TensorList" before)."""
    fitted = GuidanceConfig(fit_iterations=1, fit_depth=depth, fit_fraction=1.0)
    result = studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=2, guidance=fitted))
    assert result.request.references.enabled and np.isfinite(pixels(result)).all()


def test_the_self_bound_holds_on_reference_rows_above_the_precomputed_size(studio, monkeypatch):
    from kernels import bounded_self_attention as bounded

    bound = GuidanceConfig(bound_self_attention=True)
    request = GenerateRequest(PROMPT, layout=LAYOUT, seed=3, steps=3, guidance=bound)
    precomputed = studio.generate(request)
    unbounded = studio.generate(replace(request, guidance=GuidanceConfig()))
    monkeypatch.setattr(bounded, "PRECOMPUTED_MAX_CELLS", 16)  # every resolution: the bound built per query chunk
    chunked = studio.generate(request)
    assert np.abs(pixels(chunked) - pixels(precomputed)).max() <= 1
    assert np.abs(pixels(unbounded) - pixels(precomputed)).max() > 1  # the bound shows in the picture
