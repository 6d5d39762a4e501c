"""PNG metadata round trip and the generate command line: same pixels as diffusers, clear one-line errors."""

import json
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
    assert run.stderr.strip().count("\n") == 0 and "could not load the model" in run.stderr
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


# ------------------------------------------------------------------------------------------------ references
def _parsed(*args: str):
    from studio.__main__ import build_parser

    return build_parser().parse_args(["generate", "--prompt", "a photo of <al>", *args])


def test_reference_flags_become_the_requests_reference_config():
    from studio.cli.common import model_spec
    from studio.cli.generate import build_request

    args = _parsed(
        "--references", "on", "--reference-strength", "2.5", "--image-guidance", "3", "--image-guidance-growth",
        "1.5", "--no-reference-adapter", "--start", "collage", "--start-strength", "0.6", "--reference-adapter", "none",
    )  # fmt: skip
    assert build_request(args).references == ReferenceConfig(True, 2.5, False, 3.0, 1.5, "collage", 0.6)
    assert model_spec(args).reference_adapter == "none"
    defaults = _parsed()
    assert build_request(defaults).references == ReferenceConfig()  # auto: on whenever a subject has photos
    assert model_spec(defaults).reference_adapter == "auto"
    assert build_request(_parsed("--references", "off")).references.enabled is False
    assert model_spec(_parsed("--reference-adapter", "my.safetensors")).reference_adapter == "my.safetensors"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reference-strength", "9"], "reference strength must be in 0..8"),
        (["--reference-strength", "nan"], "reference strength must be in 0..8"),
        (["--image-guidance", "-1"], "image guidance must be in 0..30"),
        (["--image-guidance-growth", "31"], "image guidance growth must be in 0..30"),
        (["--start-strength", "0"], "start strength must be in (0, 1]"),
        (["--reference-adapter", "adapter.bin"], "reference adapter must be auto, none or a .safetensors file"),
    ],
)
def test_cli_bad_reference_values_are_one_line_and_exit_2(args, message, tiny_sd15_dir, capsys):
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "a photo of dog", "--steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("args", [["--references", "maybe"], ["--start", "spiral"], ["--reference-strength", "lots"]])
def test_cli_unknown_reference_choices_name_the_flag(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "a photo of dog", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and args[0] in err[-1] and "Traceback" not in "\n".join(err)


@pytest.fixture(scope="module")
def cli_library(sd15, tiny_sd15_dir, tmp_path_factory) -> Path:
    """al: instant (registered by the CLI); bo: trained; cy: trained, its photo files deleted by hand."""
    from engines.library import SubjectLibrary
    from engines.register import register_subject
    from engines.types import RegisterRequest
    from tests.tiny_models import subject_photos

    folder = tmp_path_factory.mktemp("cli_library")
    photos = subject_photos(folder, "al", 1)
    register = ["register", "--model", str(tiny_sd15_dir), "--library", str(folder / "library")]
    assert main([*register, "--name", "al", "--class", "ball", "--preset", "instant", *photos]) == 0
    library = SubjectLibrary(folder / "library")
    for name in ("bo", "cy"):
        register_subject(sd15, RegisterRequest(name, "dog", tuple(photos), preset="quick"), library,
                         overrides={"steps": 2, "reg_pool": 16, "delta_sentences": 16})  # fmt: skip
    for photo in library.get("cy").photos:
        Path(photo).unlink()
    return folder / "library"


def test_subjects_list_says_what_each_subject_has(cli_library, capsys):
    assert main(["subjects", "list", "--library", str(cli_library)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "photos only" in rows["al"] and "residual + photos" in rows["bo"] and "residual only" in rows["cy"]
    assert main(["subjects", "list", "--json", "--library", str(cli_library)]) == 0
    holds = {row["name"]: row["holds"] for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert holds == {"al": "photos only", "bo": "residual + photos", "cy": "residual only"}


def test_register_help_lists_the_presets_and_why(capsys):
    from engines.types import REGISTER_PRESETS

    with pytest.raises(SystemExit):
        main(["register", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, preset in REGISTER_PRESETS.items():
        assert name in text and " ".join(preset.why.split()) in text


def test_an_instant_subject_in_a_box_with_every_reference_flag(cli_library, tiny_sd15_dir, tmp_path):
    out = tmp_path / "al.png"
    code = main([
        "generate", "--model", str(tiny_sd15_dir), "--library", str(cli_library), "--prompt", "a photo of <al> on grass",
        "--box", "<al>=0.1,0.2,0.6,0.9", "--references", "on", "--reference-strength", "1.5", "--image-guidance", "2",
        "--start", "collage", "--start-strength", "0.5", "--steps", "4", "--seed", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    request = read_request(out)
    assert request.references == ReferenceConfig(True, 1.5, True, 2.0, 0.0, "collage", 0.5)
    assert request.layout.regions[0].subject == "al"


def test_the_results_warnings_go_to_stderr(cli_library, tiny_sd15_dir, tmp_path, capsys):
    code = main([
        "generate", "--model", str(tiny_sd15_dir), "--library", str(cli_library), "--prompt", "a photo of <cy>",
        "--references", "on", "--steps", "1", "--seed", "1", "--out", str(tmp_path / "cy.png"),
    ])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    assert "warning: <cy> has no photos left: it is drawn from its trained residual alone" in err
    assert "warning: references are on, but no subject in the prompt has photos" in err
