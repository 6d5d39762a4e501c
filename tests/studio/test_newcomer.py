"""What a new user reads first on the command line: the register run's preset and losses, an ETA that does not
count the first step's warm-up, list headers, and one line (not a traceback) from a Python outside the venv."""

from dataclasses import replace

import pytest

from engines.types import REGISTER_PRESETS, StepProgress
from studio.__main__ import main
from studio.cli.progress import EtaClock
from studio.cli.register import loss_line, preset_line
from tests.tiny_models import subject_photos


def test_the_eta_waits_for_a_second_step_and_leaves_out_the_first_steps_time():
    clock = EtaClock(window=20)
    assert clock.eta(StepProgress(step=1, total=300, elapsed=9.0)) is None  # the warm-up step alone: no guess
    assert clock.eta(StepProgress(step=2, total=300, elapsed=10.0)) == pytest.approx(298.0)  # 1 s a step, not 5
    for step in range(3, 40):
        eta = clock.eta(StepProgress(step=step, total=300, elapsed=8.0 + 2.0 * step))  # the machine got busier
    assert eta == pytest.approx(2.0 * (300 - 39))
    assert clock.eta(StepProgress(step=1, total=20, elapsed=0.5)) is None  # a new run starts over


def test_register_says_its_preset_first_and_the_loss_before_and_after(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    # the real CLI path on the tiny model, shortened (the default preset's 300 steps are the README's business)
    short = replace(REGISTER_PRESETS["quick"], steps=4, reg_pool=16, delta_sentences=16, reg_batch=2)
    monkeypatch.setitem(REGISTER_PRESETS, "quick", short)
    photos = subject_photos(tmp_path, "rex", 2)
    args = ["register", "--model", str(tiny_sd15_dir), "--library", str(tmp_path / "lib"), "--name", "rex"]
    assert main([*args, "--class", "dog", "--preset", "quick", *photos]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == "preset quick: 4 steps (--preset instant | quick | standard | thorough; --help says " \
        "what each is for)"  # fmt: skip
    assert "registered <rex> (dog, sd15, 4 steps; residual + photos)" in out
    assert "loss on its photos: " in out and " before, " in out and " after (" in out
    assert main(["subjects", "list", "--library", str(tmp_path / "lib")]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "CLASS", "FAMILY", "HOLDS", "CREATED"] and row.split()[:3] == [
        "rex",
        "dog",
        "sd15",
    ]
    assert main(["relations", "list", "--library", str(tmp_path / "lib")]) == 0
    assert capsys.readouterr().out == ""  # no header over an empty list (stderr says how to teach one)


def test_the_loss_line_says_when_the_subject_may_not_be_learned():
    assert loss_line(0.1, 0.05) == "loss on its photos: 0.1000 before, 0.0500 after (-50%)"
    assert "may not be learned" in loss_line(0.042, 0.040)  # the underfit case of docs/registration.md
    assert preset_line("instant") == "preset instant: no training (the photos and their masks are kept)"
    assert preset_line("standard").startswith("preset standard: 300 steps")


def test_a_python_without_the_runtime_is_one_line_and_exit_2(capsys, monkeypatch):
    import studio

    monkeypatch.setattr(studio, "RUNTIME", ("torch", "no_such_module_troupe"))
    assert main(["subjects", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no no_such_module_troupe" in err[0] and ".venv/bin/python" in err[0]
