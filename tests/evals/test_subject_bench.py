"""The subject identity bench: seeded compositions, and a scorer that tells the subject's look from the plain class."""

from dataclasses import replace

import pytest

from demo_world.scenes import SIZE, render_scene
from engines.models import DEMO_MODEL_DIR
from evals.subject_bench import BENCH_SUBJECTS, compositions, run_subject_bench, score_identity


def _render(composition, spec):
    x0, y0, x1, y1 = composition.layout.regions[0].box
    placed = replace(spec, cx=(x0 + x1) / 2 * SIZE, cy=(y0 + y1) / 2 * SIZE, size=(x1 - x0) * SIZE)
    return render_scene([placed], composition.background).image


def test_compositions_are_seeded_and_keep_the_companion_apart():
    name, spec = BENCH_SUBJECTS[0]
    first = compositions(name, spec, 6)
    assert first == compositions(name, spec, 6)
    for composition in first:
        subject, companion = composition.layout.regions
        assert subject.subject == name and companion.phrase in composition.prompt(f"<{name}>")
        assert subject.box[2] <= companion.box[0] or companion.box[2] <= subject.box[0]  # side by side
        assert spec.colour not in companion.phrase and spec.colour2 not in companion.phrase


def test_identity_needs_the_pattern_and_its_second_colour():
    for name, spec in BENCH_SUBJECTS:
        composition = compositions(name, spec, 1)[0]
        exact = score_identity(_render(composition, spec), composition, 0.0)
        assert exact.present and exact.identity and exact.iou > 0.8
        plain = score_identity(_render(composition, replace(spec, pattern="plain", colour2=None)), composition, 0.0)
        assert plain.present and not plain.identity


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model_index.json").exists(), reason="the demo model is not built")
def test_a_subject_registered_on_the_demo_model_keeps_its_pattern():
    """5 photos of a blue ball with yellow stripes, the quick preset, then 4 new compositions."""
    from engines.service import Studio
    from engines.types import ModelSpec
    from evals.common import BenchOptions

    report = run_subject_bench(Studio(ModelSpec("demo")), BenchOptions(quick=True))
    registered, plain = report["rows"]["registered subject"], report["rows"]["class word only"]
    assert registered["identity"] >= 0.5  # its colour, category, stripes and their colour
    assert plain["identity"] == 0.0  # the class word alone never draws them
