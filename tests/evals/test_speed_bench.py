"""The speed bench (python -m studio bench --speed) on the demo model: every case timed beside vanilla diffusers, its
JSON fields, the operator count of guided attention, registration per preset; bad options are one line."""

from __future__ import annotations

import json

import pytest

from evals.speed_bench import GUIDED, REFERENCES, UNGUIDED, VANILLA, speed_tables
from studio.__main__ import main


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    argv = ["bench", "--speed", "--random-arch", "demo", "--steps", "2", "--repeats", "1", "--register-presets",
            "quick", "--register-steps", "2", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_every_case_has_time_ratio_and_peak_memory(report):
    assert set(report["cases"]) == {VANILLA, UNGUIDED, REFERENCES, *GUIDED}
    for case in report["cases"].values():
        assert case["seconds_per_image"] > 0 and case["ratio_to_vanilla"] > 0 and case["peak_memory_mb"] > 100
    assert report["cases"][VANILLA]["ratio_to_vanilla"] == 1.0
    assert report["device"].startswith("CPU") and report["family"] == "demo"


def test_guided_attention_adds_operators_and_registration_is_timed(report):
    ops = report["operators"]
    assert ops["plain_cross_attention"] > 0
    assert ops["added_per_guided_cross_attention_call"] == ops["guided_cross_attention"] - ops["plain_cross_attention"]
    assert 0 < ops["added_per_guided_cross_attention_call"] <= 8  # issue 18's goal (fp32 here)
    assert ops["added_per_bounded_self_attention_call"] == 0  # the bound is made once per request
    quick = report["registration"]["quick"]
    assert quick["steps_timed"] == 2 and quick["estimated_seconds"] > quick["seconds_per_step"] > 0
    assert "| vanilla diffusers | " in speed_tables(report)


def test_bad_speed_options_are_one_line(capsys):
    assert main(["bench", "--speed", "--register-steps", "1"]) == 2
    assert main(["bench", "--speed", "--register-presets", "fast"]) == 2
    assert main(["bench", "--speed", "--cases", "guided,warp"]) == 2
    assert capsys.readouterr().err.count("error: speed bench") == 3
