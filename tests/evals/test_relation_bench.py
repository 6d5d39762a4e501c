"""The relation bench end to end on the tiny model (two training steps, one scene per row): every row and the
identity part are measured and reported, and nothing is left in the library."""

from dataclasses import replace

from engines.service import Studio
from engines.types import ModelSpec, RelationTrainRequest
from evals.common import BenchOptions
from evals.relation_bench import RELATIONS, ROWS, run_relation_bench


def test_the_bench_reports_every_row_of_both_relations(tiny_sd15_dir, tmp_path):
    studio = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path / "library")
    seen = []
    train = replace(RelationTrainRequest("x", "x"), steps=2)
    report = run_relation_bench(studio, BenchOptions(layouts=1, steps=2), seen.append, train)
    assert list(report["relations"]) == list(RELATIONS) and report["training_steps"] == 2
    for result in report["relations"].values():
        assert [row for row in result["rows"]] == [row.title for row in ROWS]
        assert all(0 <= m["accuracy"] <= 1 and m["images"] == 1 for m in result["rows"].values())
        assert [m["images"] for m in result["identity"].values()] == [1, 1, 1]
        assert set(result["training_seconds"]) == {"lora", "lora-keypoints"}
    assert seen[-1].step == seen[-1].total == len(RELATIONS) * (len(ROWS) + 3)
    assert studio.learned_relations() == []  # the bench trains in a library of its own
