"""The demo-world benchmark: cases are fixed and scoreable, the scorer rewards exact renders and nothing else,
and on the shipped demo model, guidance beats no guidance."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from demo_world.scenes import BACKGROUNDS, random_scene
from engines.models import DEMO_MODEL_DIR
from engines.types import InputError
from evals.common import HELD_OUT_SEED_OFFSET, BenchOptions
from evals.layout_bench import (
    bench_cases,
    layer_order,
    run_bench,
    score,
    summarise,
)
from studio.__main__ import main

EXACT_RENDERS = SimpleNamespace(model_info=lambda: {"source": "exact renders", "family": "demo"})  # modes=(): no model


def test_cases_are_deterministic_with_distinct_colours():
    first, again = bench_cases(8), bench_cases(8)
    assert first == again
    for case in first:
        assert len(set(case.colours)) == len(case.colours)
        assert all(r.phrase in case.prompt for r in case.layout.regions)


def test_the_held_out_run_scores_other_layouts_than_the_bench():
    bench = run_bench(EXACT_RENDERS, BenchOptions(modes=(), subjects=False))  # no generation: the exact renders only
    held_out = run_bench(EXACT_RENDERS, BenchOptions(modes=(), subjects=False, held_out=True))
    assert (bench["layouts"], held_out["layouts"]) == ("bench", "held-out")
    assert held_out["cases"] == bench["cases"] == 60
    assert held_out["modes"]["ground truth"] != bench["modes"]["ground truth"]
    assert not {c.seed for c in bench_cases(60)} & {c.seed for c in bench_cases(60, HELD_OUT_SEED_OFFSET)}


def test_any_number_of_layouts_can_come_from_any_seed():
    wide = run_bench(EXACT_RENDERS, BenchOptions(modes=(), subjects=False, layouts=100, first_seed=7_000_000))
    assert (wide["cases"], wide["layouts"]) == (100, "from seed 7000000")
    assert wide["modes"]["ground truth"]["all"]["layouts"] == 100


@pytest.mark.parametrize(
    "options, message",
    [
        ({"modes": ("none", "fitted")}, "unknown bench mode fitted"),
        ({"layouts": 0}, "at least 1 layout"),
        ({"first_seed": -1}, "first seed"),
        ({"held_out": True, "first_seed": 7_000_000}, "choose one"),
    ],
)
def test_bad_bench_choices_are_refused_with_their_name(options, message):
    with pytest.raises(InputError, match=message):
        run_bench(EXACT_RENDERS, BenchOptions(subjects=False, **options))


def test_cli_bench_with_an_unknown_mode_is_one_line_and_exit_2(tiny_sd15_dir, capsys):
    code = main(["bench", "--model", str(tiny_sd15_dir), "--no-subjects", "--modes", "troupe, fited"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown bench mode fited" in err[0]


def test_exact_renders_score_high_and_blank_canvases_score_zero():
    cases = [c for c in bench_cases(30) if len(c.colours) == 1]
    for case in cases:
        exact = score(random_scene(case.seed).image, case, 0.0)
        assert exact.ious[0] > 0.85 and exact.present[0] and exact.colour_ok[0]
        blank = np.full((64, 64, 3), BACKGROUNDS["grass"], np.uint8)
        empty = score(blank, case, 0.0)
        assert empty.ious == (0.0,) and empty.present == (False,)


def test_layer_order_sees_which_colour_wins_the_overlap():
    case = next(c for c in bench_cases(200) if len(layer_order(random_scene(c.seed).image, c)) > 0)
    image = random_scene(case.seed).image
    assert all(layer_order(image, case))
    flipped = case.layout.regions[::-1]
    swapped = replace(
        case,
        layout=type(case.layout)(
            tuple(type(r)(r.phrase, r.box, layer=len(flipped) - 1 - r.layer) for r in case.layout.regions)
        ),
    )
    assert not any(layer_order(image, swapped))


def test_exact_renders_keep_every_layer_order():
    """The overlap is the two whole shapes', not their boxes': a ring's hole shows what is behind it."""
    results = [ok for case in bench_cases(60) for ok in layer_order(random_scene(case.seed).image, case)]
    assert len(results) >= 15 and all(results)


def test_recognisable_presence_leaves_out_objects_the_detector_cannot_read_even_in_exact_renders():
    cases = bench_cases(60)
    hidden = [c for c in cases if not all(c.recognisable)]
    assert hidden, "some held-out layouts hide part of an object behind another"
    assert sum(all(c.recognisable) for c in cases) > 40  # most objects can be scored
    exact = summarise([score(random_scene(c.seed).image, c, 0.0) for c in cases])["all"]
    assert exact["presence"] < 1.0 and exact["recognisable_presence"] == 1.0
    blank = np.full((64, 64, 3), BACKGROUNDS["sky"], np.uint8)
    assert summarise([score(blank, c, 0.0) for c in cases])["all"]["recognisable_presence"] == 0.0


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model_index.json").exists(), reason="the demo model is not built")
def test_quick_bench_on_the_demo_model_guidance_beats_none_and_fitting_beats_guidance_alone():
    from engines.service import Studio
    from engines.types import ModelSpec

    report = run_bench(
        Studio(ModelSpec("demo")), BenchOptions(quick=True, modes=("none", "troupe", "troupe-fitted"), subjects=False)
    )
    none, troupe = report["modes"]["none"]["all"], report["modes"]["troupe"]["all"]
    fitted = report["modes"]["troupe-fitted"]["all"]
    assert troupe["layout_iou"] > none["layout_iou"] + 0.1
    assert troupe["layer_order_accuracy"] > none["layer_order_accuracy"]
    assert fitted["layout_iou"] > troupe["layout_iou"] + 0.05
    assert fitted["recognisable_presence"] >= troupe["recognisable_presence"] - 0.1
    decoded = report["modes"]["ground truth through the VAE"]["all"]  # the model's ceiling, next to the scorer's
    assert 0.8 < decoded["layout_iou"] <= report["modes"]["ground truth"]["all"]["layout_iou"]


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model_index.json").exists(), reason="the demo model is not built")
def test_the_vae_ceiling_is_the_scene_as_the_demo_models_decoder_returns_it():
    from engines.service import Studio
    from engines.types import ModelSpec

    image = random_scene(bench_cases(1)[0].seed).image
    decoded = Studio(ModelSpec("demo")).vae_roundtrip(image)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert 0 < np.abs(decoded.astype(int) - image).mean() < 10  # close, but blurred: not the render itself
