"""PNG metadata round trip and the generate command line: same pixels as diffusers, clear one-line errors."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.generate import Generator
from engines.metadata import read_request, save_png
from engines.types import GenerateRequest, GuidanceConfig, InputError, Layout, ReferenceConfig, Region
from studio.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_png_round_trips_the_request(sd15, tmp_path):
    layout = Layout((Region("dog", (0.0, 0.1, 0.5, 0.9)), Region("cat", (0.4, 0.1, 1.0, 0.9), layer=1)))
    request = GenerateRequest(
        "a photo of dog and cat",
        negative_prompt="blurry",
        layout=layout,
        seed=9,
        steps=2,
        scheduler="euler",
        guidance=GuidanceConfig(strength=0.1, bound_self_attention=True),
    )
    result = Generator(sd15)(request)
    path = save_png(result.images[0], tmp_path / "out.png")
    assert read_request(path) == replace(request, references=ReferenceConfig(enabled=False))  # what was decided
    assert result.request == read_request(path)
    assert Image.open(path).info["parameters"].startswith("a photo of dog and cat\nNegative prompt: blurry\nSteps: 2")


def test_reading_a_png_without_settings_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="no Troupe settings"):
        read_request(tmp_path / "plain.png")


def test_unknown_keys_in_saved_settings_are_refused():
    data = GenerateRequest("a dog").to_dict() | {"sampler": "euler"}
    with pytest.raises(InputError, match="GenerateRequest: unknown keys sampler"):
        GenerateRequest.from_dict(data)


def test_cli_without_boxes_gives_the_diffusers_pixels(sd15, tiny_sd15_dir, tmp_path):
    out = tmp_path / "cli.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd15_dir),
            "--prompt",
            "a photo of dog",
            "--seed",
            "4",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    expected = sd15.pipe(
        "a photo of dog", num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(4)
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_cli_with_boxes_writes_a_png_that_round_trips(tiny_sd15_dir, tmp_path):
    out = tmp_path / "boxes.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd15_dir),
            "--prompt",
            "a photo of dog and cat",
            "--seed",
            "2",
            "--steps",
            "2",
            "--box",
            "dog=0,0,0.5,1",
            "--box",
            "cat=0.5,0,1,1@0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    request = read_request(out)
    assert [(r.phrase, r.layer) for r in request.layout.regions] == [("dog", 0), ("cat", 0)]
    assert request.seed == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "dog=0,0,1.5,1"], "must lie inside the canvas"),
        (["--box", "dog=0.5,0,0.5,1"], "zero area"),
        (["--box", "cow=0,0,1,1"], "'cow' is not in the prompt"),
        (["--box", "dog:0,0,1,1"], "WORDS=x0,y0,x1,y1"),
        (["--out", "x.jpg"], "PNG"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tiny_sd15_dir, capsys):
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "a photo of dog", "--steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_cli_unreadable_model_in_a_fresh_process(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    run = subprocess.run(
        [sys.executable, "-m", "studio", "generate", "--model", str(tmp_path), "--prompt", "a dog"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "could not load model" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_generate_command_never_imports_gradio(tiny_sd15_dir, tmp_path):
    """The UI is one command among several: generating from the command line must not pay for Gradio's import."""
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "studio",
        "generate",
        "--model",
        str(tiny_sd15_dir),
        "--prompt",
        "a photo of dog",
        "--box",
        "dog=0,0,0.5,1",
        "--steps",
        "2",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "dog.png"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")]
    assert "engines.generate" in imported and not [m for m in imported if m.split(".")[0] == "gradio"]
