"""generate --reuse PNG: start from a Troupe, A1111 or ComfyUI PNG; the options typed override it; what could not
be carried over is one line."""

from __future__ import annotations

import json

from PIL import Image, PngImagePlugin

from engines.metadata import read_request
from studio.__main__ import build_parser, main

A1111_TEXT = (
    "a photo of dog and cat, <lora:film:0.5>\nNegative prompt: blurry\n"
    "Steps: 30, Sampler: Euler a, CFG scale: 5, Seed: 77, Size: 64x96, Model: v1-5-pruned-emaonly"
)


def a1111_png(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (64, 96)).save(path, pnginfo=info)
    return path


def test_reuse_an_a1111_png_with_options_over_it(tiny_sd15_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tiny_sd15_dir), "--reuse", str(a1111_png(tmp_path)), "--steps", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "v1-5-pruned-emaonly" in note[0] and "lora film (0.5)" in note[0]
    request = read_request(out)
    assert (request.prompt, request.negative_prompt) == ("a photo of dog and cat,", "blurry")
    assert (request.seed, request.cfg, request.scheduler, request.width, request.height) == (77, 5.0, "euler_a", 64, 96)
    assert request.steps == 2  # typed: over the PNG's 30
    # the Troupe PNG just written reuses as it was made, seed and all
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(tiny_sd15_dir), "--reuse", str(out), "--out", str(again)]) == 0
    assert read_request(again) == request


def test_a_typed_default_still_overrides(tmp_path):
    args = build_parser().parse_args(["generate", "--reuse", "x.png", "--steps", "20", "--sampler", "DPM++ 2M Karras"])
    assert args.given == {"steps", "scheduler"} and args.scheduler == "dpmpp_2m_karras"


def test_reuse_of_a_png_without_settings_is_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--reuse", str(tmp_path / "plain.png")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_unknown_sampler_names_the_choices(capsys):
    try:
        build_parser().parse_args(["generate", "--prompt", "x", "--scheduler", "DPM++ 3M"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unknown sampler 'DPM++ 3M' (choose from Default, Euler" in capsys.readouterr().err


def test_comfyui_png_reuses(tiny_sd15_dir, tmp_path):
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 2, "cfg": 3.0, "sampler_name": "uni_pc",
              "scheduler": "normal", "denoise": 1.0, "positive": ["6", 0], "negative": ["7", 0],
              "latent_image": ["5", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of dog"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
    }  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (64, 64)).save(tmp_path / "comfy.png", pnginfo=info)
    out = tmp_path / "out.png"
    assert (
        main(["generate", "--model", str(tiny_sd15_dir), "--reuse", str(tmp_path / "comfy.png"), "--out", str(out)])
        == 0
    )
    request = read_request(out)
    assert (request.prompt, request.seed, request.steps, request.scheduler) == ("a photo of dog", 5, 2, "unipc")
