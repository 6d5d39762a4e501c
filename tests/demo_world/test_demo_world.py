"""The demo world: scenes, detector, tokenizer, and (if present) the embedded demo model. Offline, CPU, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from demo_world.detector import detect, detect_background, match
from demo_world.scenes import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    ObjectSpec,
    random_scene,
    render_scene,
    shape_mask,
    subject_photos,
)
from demo_world.tokenizer import world_words, write_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "demo_model"


def test_palette_is_the_published_interface():
    assert BACKGROUNDS == {
        "grass": (110, 170, 90),
        "sky": (150, 200, 245),
        "sand": (225, 205, 150),
        "night": (35, 35, 70),
    }
    assert COLOURS == {
        "red": (215, 40, 40),
        "blue": (40, 70, 210),
        "yellow": (245, 200, 30),
        "purple": (140, 60, 180),
        "orange": (245, 130, 30),
        "cyan": (40, 200, 200),
    }
    assert CATEGORIES == ("ball", "box", "tent", "star", "ring")


def test_scenes_are_deterministic_and_consistent():
    for seed in range(20):
        a, b = random_scene(seed), random_scene(seed)
        assert np.array_equal(a.image, b.image) and a.caption == b.caption
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
        assert 1 <= len(a.objects) <= 4
        for layer, o in enumerate(a.objects):
            assert o.layer == layer
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            if o.mask.any():  # visible pixels have the object's colours
                cols = {tuple(c) for c in a.image[o.mask]}
                assert cols <= {COLOURS[o.colour], COLOURS.get(o.colour2, COLOURS[o.colour])}
        # later objects occlude earlier ones: visible masks are disjoint
        total = sum(o.mask.astype(int) for o in a.objects)
        assert total.max() <= 1
    assert random_scene(1).caption != random_scene(2).caption or not np.array_equal(
        random_scene(1).image, random_scene(2).image
    )


def test_shape_fill_ratios():
    fills = {}
    for cat in CATEGORIES:
        m = shape_mask(cat, 32.0, 32.0, 40.0)
        ys, xs = np.nonzero(m)
        fills[cat] = m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    assert fills["box"] > 0.95 and abs(fills["ball"] - 0.785) < 0.05 and abs(fills["tent"] - 0.5) < 0.06
    assert 0.33 < fills["star"] < 0.45 and abs(fills["ring"] - 0.59) < 0.06


def test_render_scene_and_subject_photos():
    spec = ObjectSpec("ball", "blue", "striped", "yellow", 30, 30, 30)
    sc = render_scene([spec], "sand", seed=3)
    px = {tuple(c) for c in sc.image[sc.objects[0].mask]}
    assert px == {COLOURS["blue"], COLOURS["yellow"]}
    photos = subject_photos(spec, 4, seed=1)
    assert len(photos) == 4 and all(p.objects[0].pattern == "striped" for p in photos)
    with pytest.raises(ValueError):
        ObjectSpec("dog", "red")


def test_detector_iou_on_clean_renders():
    """Evaluable objects: >= 95% visible and no other object sharing a colour within 5 px (detector docstring)."""
    n = hits = cat = col = pat = 0
    for seed in range(200):
        sc = random_scene(seed)
        assert detect_background(sc.image) == sc.background
        for o, d, iou in match(detect(sc.image), sc.objects):
            n += 1
            if d is not None and iou >= 0.9:
                hits += 1
                cat += d.category == o.category
                col += d.colour == o.colour
                pat += d.pattern == o.pattern
    assert n > 150
    assert hits / n >= 0.97, hits / n
    assert cat / hits >= 0.98 and col / hits >= 0.99 and pat / hits >= 0.9, (cat / hits, col / hits, pat / hits)


def test_patterned_object_is_one_detection():
    for pattern in ("striped", "dotted"):
        for cat in CATEGORIES:
            sc = render_scene([ObjectSpec(cat, "red", pattern, "cyan", 32, 32, 36)], "grass", seed=0)
            dets = detect(sc.image)
            assert len(dets) == 1, (cat, pattern, [(d.colour, d.category) for d in dets])
            assert dets[0].category == cat and dets[0].colour == "red" and dets[0].colour2 == "cyan"


def test_tokenizer_world_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    for w in world_words():
        assert len(tok.tokenize(w)) == 1, w
    for w in ("dog", "cat", "photo", "hugging", "riding", "stripes", "inside", "behind", "beach"):
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok("a photo of a zebra-like xylophone 42!").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofazebra-likexylophone42!"
    assert tok.model_max_length == 77


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="assets/demo_model not built")
def test_demo_model_loads_offline_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(MODEL), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt"))
    img = pipe(
        "a red ball on grass",
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="assets/demo_model not built")
def test_demo_model_draws_what_captions_ask_patterns_included():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(MODEL), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    asked = {  # caption: (colour, category, pattern, second colour)
        "a red ball on grass": ("red", "ball", "plain", None),
        "a blue box on sand": ("blue", "box", "plain", None),
        "a yellow star in the sky": ("yellow", "star", "plain", None),
        "a purple tent at night": ("purple", "tent", "plain", None),
        "a cyan ring on grass": ("cyan", "ring", "plain", None),
        "an orange ball with cyan stripes on sand": ("orange", "ball", "striped", "cyan"),
        "a blue box with yellow dots on grass": ("blue", "box", "dotted", "yellow"),
        "a red star with blue stripes at night": ("red", "star", "striped", "blue"),
    }
    images = pipe(
        list(asked),
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    drawn = [
        {(d.colour, d.category, d.pattern, d.colour2) for d in detect((image * 255).round().astype(np.uint8))}
        for image in images
    ]
    kinds = [{look[:2] for look in looks} for looks in drawn]
    assert sum(want[:2] in got for want, got in zip(asked.values(), kinds)) >= 7
    patterned = [(want, got) for want, got in zip(asked.values(), drawn) if want[2] != "plain"]
    assert sum(want in got for want, got in patterned) >= 2


def test_trainer_refuses_to_resume_another_recipe(tmp_path):
    from demo_world.train import check_recipe

    recipe = dict(scenes=200_000, steps=11_000, batch=512)
    check_recipe(tmp_path, recipe)
    check_recipe(tmp_path, recipe)  # the same recipe resumes
    with pytest.raises(SystemExit, match="steps: 11000 -> 12000"):
        check_recipe(tmp_path, dict(recipe, steps=12_000))
