"""Issue 20 on the command line and the canvas: checks before the expensive work, one line instead of a traceback,
the UI refusing what the CLI refuses, and `subjects check`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engines.library import SubjectLibrary
from engines.types import InputError, SubjectInfo
from studio.__main__ import main
from studio.cli.generate import output_paths
from studio.ui.canvas import canvas_to_layout


def canvas(box, **extra) -> str:
    return json.dumps({"width": 64, "height": 64, "regions": [{"label": "dog", "box": box}], **extra})


@pytest.mark.parametrize(
    "box", [[-0.1, 0, 0.5, 0.5], [0, 0, 1.5, 1], [True, 0, 0.5, 0.5], [0, 0, 0.5, False], [0, 0, 10**400, 1]]
)
def test_the_canvas_refuses_boxes_the_cli_refuses(box):
    with pytest.raises(InputError):
        canvas_to_layout(canvas(box), {})


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"regions": [{"label": "dog", "box": [NaN, 0, 1, 1]}]}',
        canvas([0, 0, 1, 1], suggestions=5),
        json.dumps({"regions": [{"label": {"a": 1}, "box": [0, 0, 1, 1]}]}),
    ],
)
def test_odd_canvas_json_is_one_line(text):
    with pytest.raises(InputError):
        canvas_to_layout(text, {})


def test_output_paths_are_checked_before_generating(tmp_path):
    for out in ("/proc/x.png", str(tmp_path)):
        with pytest.raises(InputError):
            output_paths(out, 1)
    (tmp_path / "taken-2.png").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        output_paths(str(tmp_path / "taken.png"), 2)
    assert output_paths(str(tmp_path / "new" / "x.png"), 1) == [tmp_path / "new" / "x.png"]
    assert not (tmp_path / "new").exists()  # checking makes nothing


def test_bench_refuses_zero_layouts_in_every_mode(capsys):
    for mode in ([], ["--speed"]):
        assert main(["bench", *mode, "--layouts", "0", "--model", "/nonexistent/model"]) == 2
        assert capsys.readouterr().err.strip() == "error: bench: --layouts must be an integer in 1..100000 (got 0)"


def test_generate_refuses_seed_overflow_and_bad_out_before_the_model(tmp_path, capsys):
    base = ["generate", "--prompt", "a red ball", "--model", "/nonexistent/model", "--library", str(tmp_path)]
    assert main([*base, "--seed", str(2**63 - 1), "--num-images", "2", "--out", str(tmp_path / "a.png")]) == 2
    assert "2⁶³−1" in capsys.readouterr().err
    assert main([*base, "--out", "/proc/x.png"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu:9", "meta"])
def test_an_unknown_device_is_one_line(tmp_path, capsys, device):
    args = ["generate", "--prompt", "a ball", "--device", device, "--out", str(tmp_path / "a.png")]
    assert main([*args, "--library", str(tmp_path)]) == 2
    assert f"device '{device}'" in capsys.readouterr().err


def test_misleading_model_lines_are_gone(tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    cases = {
        "/etc/passwd": "is not a model",
        str(tmp_path / "garbage.safetensors"): "not a readable safetensors file",
        str(broken): "could not load the model at",
    }
    for model, message in cases.items():
        args = ["generate", "--prompt", "a ball", "--model", model, "--out", str(tmp_path / "a.png")]
        assert main([*args, "--library", str(tmp_path / "lib")]) == 2
        err = capsys.readouterr().err
        assert message in err and "huggingface-cli" not in err and err.count("\n") == 1


def add_subject(root, name="rex"):
    info = SubjectInfo(name, "dog", "demo", "abc", "2026-01-01T00:00:00+00:00", 1)
    image, mask = Image.new("RGB", (64, 64), "red"), Image.new("L", (64, 64), 255)
    SubjectLibrary(root).add(info, {"text_encoder": torch.randn(1, 128)}, [image], [mask])


def test_subjects_check_and_repair(tmp_path, capsys):
    root = tmp_path / "lib"
    add_subject(root)
    assert main(["subjects", "check", "--library", str(root)]) == 0
    (root / "stray.txt").write_text("x")
    (root / "ghost").mkdir()
    assert main(["subjects", "check", "--library", str(root)]) == 1
    out = capsys.readouterr().out
    assert "stray.txt: a file" in out and "ghost: subject folder ghost: subject.json is missing" in out
    assert main(["subjects", "check", "--repair", "--library", str(root)]) == 0
    assert "moved to .broken/" in capsys.readouterr().out
    assert main(["subjects", "check", "--library", str(root)]) == 0
    assert main(["subjects", "list", "--library", str(root)]) == 0 and "rex" in capsys.readouterr().out


def test_subjects_export_to_dev_null_is_one_line(tmp_path, capsys):
    add_subject(tmp_path / "lib")
    assert main(["subjects", "export", "rex", "/dev/null", "--library", str(tmp_path / "lib")]) == 2
    assert "not a regular file" in capsys.readouterr().err
