"""The reference bench's scenes and scorer: seeded layouts that keep subjects apart, identity that needs the whole
look, and confusion that catches one subject's look on another's object."""

from dataclasses import replace

from demo_world.scenes import SIZE, ObjectSpec, render_scene
from evals.reference_bench import SUBJECTS, score_scene, single_scenes, trio_scenes


def _render(scene, looks):
    placed = []
    for region, look in zip(scene.layout.regions, looks):
        x0, y0, x1, y1 = region.box
        placed.append(replace(look, cx=(x0 + x1) / 2 * SIZE, cy=(y0 + y1) / 2 * SIZE, size=(x1 - x0) * SIZE))
    return render_scene(placed, "grass").image


def test_scenes_are_seeded_and_a_held_out_range_gives_other_ones():
    assert trio_scenes(4, 5_000_000) == trio_scenes(4, 5_000_000)
    assert trio_scenes(4, 5_000_000) != trio_scenes(4, 6_000_000)
    for scene in trio_scenes(6, 5_000_000):
        boxes = sorted(region.box for region in scene.layout.regions)
        assert all(a[2] <= b[0] for a, b in zip(boxes, boxes[1:]))  # side by side, never overlapping
        assert sorted(scene.subjects) == sorted(name for name, _ in SUBJECTS)
        assert all(f"<{name}>" in scene.prompt for name in scene.subjects)
    singles = single_scenes(2, 5_000_000)
    assert len(singles) == 4 and all(scene.subjects[1] is None for scene in singles)


def test_the_exact_looks_score_full_identity_and_no_confusion():
    for scene in (trio_scenes(1, 5_000_000)[0], single_scenes(1, 5_000_000)[0]):
        score = score_scene(_render(scene, scene.looks), scene, 1.0, 2.0)
        assert all(score.identity) and all(score.present) and not any(score.confused)
        assert min(score.iou) > 0.7


def test_one_subjects_look_on_another_is_confusion_and_not_identity():
    scene = trio_scenes(1, 5_000_000)[0]
    stripy = scene.subjects.index("stripy")
    looks = list(scene.looks)
    for index, look in enumerate(looks):
        if index != stripy:  # the others wear stripy's yellow stripes on their own colour
            looks[index] = ObjectSpec(look.category, look.colour, "striped", "yellow")
    score = score_scene(_render(scene, looks), scene, 1.0, 2.0)
    assert score.confused[stripy] is False and sum(score.confused) == 2
    assert sum(score.identity) == 1 and all(score.present)


def test_the_bench_runs_every_photo_count_and_kind_and_counts_the_reference_pass(tiny_sd15_dir):
    """On a tiny model (the scores mean nothing there): the report's shape, and one UNet call per step more when
    the photos are read — the CFG pair is one batched call, the reference pass the other."""
    from engines.service import Studio
    from engines.types import ModelSpec
    from evals.common import BenchOptions
    from evals.reference_bench import run_reference_bench

    report = run_reference_bench(Studio(ModelSpec(str(tiny_sd15_dir))), BenchOptions(quick=True, steps=2),
                                 modes=("residual", "references"))  # fmt: skip
    assert set(report["rows"]) == {"residual", "references"}
    for mode, calls in (("residual", 1.0), ("references", 2.0)):
        for photos in ("1 photo", "3 photos"):
            for kind, metrics in report["rows"][mode][photos].items():
                assert metrics["compositions"] == 2 and metrics["unet_calls_per_step"] == calls, (mode, kind)
