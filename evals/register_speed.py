"""Registration time per preset (Cones 2 residual training) on a given model.

    python -m evals.register_speed                          # the demo model
    python -m evals.register_speed --model path/to/diffusers_folder
    python -m evals.register_speed --random-arch sd15       # full-size SD 1.5 shapes, random weights, no download
    python -m evals.register_speed --random-arch sdxl --presets quick,standard
    python -m evals.register_speed --random-arch sd15 --max-steps 5    # time a few steps, extrapolate the rest

How well a registered subject keeps its look is measured by the subject part of `python -m studio bench`.

Prints one row per preset: steps run, wall seconds, seconds per training step, the estimated full-preset time
(setup + s/step × preset steps), L_sub on a fixed set before → after, held-out preservation error and Δ bytes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from engines.library import SubjectLibrary
from engines.models import ModelBundle, load_model, resolve_device
from engines.register import register_subject
from engines.types import REGISTER_PRESETS, ModelSpec, RegisterRequest
from evals.random_models import random_bundle


def build_bundle(args) -> tuple[ModelBundle, str]:
    if args.random_arch:
        bundle = random_bundle(args.random_arch, resolve_device(args.device), args.resolution)
        return bundle, f"random {args.random_arch} (full size)"
    return load_model(ModelSpec(args.model, device=args.device)), args.model


def make_photos(folder: Path, size: int, count: int = 4) -> tuple[str, ...]:
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size + 16 * i, size), (40 + 20 * i, 140, 60))
        draw = ImageDraw.Draw(image)
        draw.ellipse((size * 0.25 + 8 * i, size * 0.2, size * 0.75 + 8 * i, size * 0.8), fill=(200, 40, 30))
        draw.rectangle((size * 0.4 + 8 * i, size * 0.35, size * 0.6 + 8 * i, size * 0.5), fill=(250, 220, 40))
        path = folder / f"photo{i}.png"
        image.save(path)
        paths.append(str(path))
    return tuple(paths)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--random-arch", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--presets", default="quick,standard,thorough")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="run at most this many steps per preset and extrapolate the full time",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="--random-arch only: train at this size instead of 512 / 1024 (a CPU smoke run)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--class-word", default="dog")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def time_preset(bundle: ModelBundle, name: str, photos: tuple[str, ...], folder: Path, args) -> dict:
    """Register once with preset `name` (at most --max-steps steps); its times, losses, Δ size and peak memory."""
    preset = REGISTER_PRESETS[name]
    steps = min(preset.steps, args.max_steps) if args.max_steps else preset.steps
    library, stamps = SubjectLibrary(folder / f"lib-{name}"), []
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    request = RegisterRequest("bench", args.class_word, photos, preset=name)
    register_subject(
        bundle,
        request,
        library,
        on_progress=lambda p: stamps.append(time.perf_counter()),
        overrides={"steps": steps, "checkpoint_every": 0},
    )
    total = time.perf_counter() - begin
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0] - begin
    stats = library.meta("bench")["stats"]
    return {
        "preset": name,
        "steps": steps,
        "of": preset.steps,
        "seconds": total,
        "per_step": per_step,
        "estimate": total - per_step * steps + per_step * preset.steps,
        "before": stats["l_sub_eval_before"],
        "after": stats["l_sub_eval_after"],
        "heldout": stats["heldout_preservation_error"],
        "bytes": (library.root / "bench" / "residuals.safetensors").stat().st_size,
        "peak": torch.cuda.max_memory_allocated() / 2**30 if bundle.device.type == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle, label = build_bundle(args)
    print(
        f"model: {label}  family {bundle.family}  device {bundle.device}  dtype {bundle.dtype}  "
        f"native {bundle.native_size}px  (built/loaded in {time.perf_counter() - started:.1f}s)"
    )
    if bundle.device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(bundle.device)}")
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photos(Path(folder), bundle.native_size)
        rows = [time_preset(bundle, name, photos, Path(folder), args) for name in args.presets.split(",")]
    print(
        f"\n{'preset':<9} {'steps':>5} {'of':>5} {'seconds':>8} {'s/step':>7} {'est.full s':>10} "
        f"{'L_sub before→after':>20} {'held-out err':>12} {'Δ bytes':>8} {'peak GiB':>8}"
    )
    for r in rows:
        print(
            f"{r['preset']:<9} {r['steps']:>5} {r['of']:>5} {r['seconds']:>8.2f} {r['per_step']:>7.3f} "
            f"{r['estimate']:>10.1f} {r['before']:>9.4f}→{r['after']:<9.4f} {r['heldout']:>12.4f} "
            f"{r['bytes']:>8} {r['peak']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
