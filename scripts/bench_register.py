"""Registration time per preset (Cones 2 residual training) on a given model.

    python scripts/bench_register.py                          # the demo model (a tiny random model if it is absent)
    python scripts/bench_register.py --model path/to/diffusers_folder
    python scripts/bench_register.py --random-arch sd15       # full-size SD 1.5 shapes, random weights, no download
    python scripts/bench_register.py --random-arch sdxl --presets quick,standard
    python scripts/bench_register.py --random-arch sd15 --max-steps 5    # time a few steps, extrapolate the rest

    python scripts/bench_register.py --model demo --identity 140,60,180   # + does Δ make the ball purple?

--identity R,G,B (demo world): the subject is a ball of that colour on grass; after registering, 12 images of
"a photo of ball on grass" are generated with and without Δ (Cones 2 Eq. 6, added at the 'ball' token) and the
share of object pixels near that colour is printed — a number to tune the presets against on a trained demo model.

Prints one row per preset: steps run, wall seconds, seconds per training step, the estimated full-preset time
(setup + s/step × preset steps), L_sub on a fixed set before → after, held-out preservation error and Δ bytes.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from engines.library import SubjectLibrary  # noqa: E402
from engines.models import DEMO_MODEL_DIR, ModelBundle, load_model  # noqa: E402
from engines.register import PRESETS, register_subject  # noqa: E402
from engines.types import ModelSpec, RegisterRequest  # noqa: E402
from scripts.random_models import random_bundle  # noqa: E402


def build_bundle(args) -> tuple[ModelBundle, str]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.random_arch:
        return random_bundle(args.random_arch, device, args.resolution), f"random {args.random_arch} (full size)"
    source = args.model
    if source == "demo" and not (DEMO_MODEL_DIR / "model_index.json").exists():
        from tests.tiny_models import save_tiny

        folder = tempfile.mkdtemp(prefix="troupe-tiny-")
        atexit.register(shutil.rmtree, folder, True)
        source = save_tiny("sd15", Path(folder) / "tiny_sd15")
        print(f"(the demo model is not built yet: {DEMO_MODEL_DIR}; using a tiny random SD 1.5 instead)",
              file=sys.stderr)
        return load_model(ModelSpec(str(source), device=args.device)), "tiny random sd15 (demo model absent)"
    return load_model(ModelSpec(source, device=args.device)), source


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


def ball_photos(folder: Path, colour: tuple[int, int, int], count: int = 4) -> tuple[str, ...]:
    """A demo-world subject: a ball of one colour at a few places and sizes on grass (64 px)."""
    paths = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), (110, 170, 90))
        r, cx, cy = 12 + 2 * i, 20 + 8 * i, 26 + 4 * (i % 2)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        path = folder / f"ball{i}.png"
        image.save(path)
        paths.append(str(path))
    return tuple(paths)


def colour_share(bundle: ModelBundle, colour: tuple[int, int, int], delta: torch.Tensor | None,
                 class_word: str = "ball", seeds: int = 12) -> float:
    """Share of object pixels (far from the grass) near `colour` in images of 'a photo of ball on grass'."""
    import numpy as np

    from engines.register import class_token_ids

    pipe, prompt = bundle.pipe, f"a photo of {class_word} on grass"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids[0].tolist()
    cls = class_token_ids(pipe.tokenizer, class_word)
    pos = next(i for i in range(len(ids)) if ids[i:i + len(cls)] == cls)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(prompt, bundle.device, 1, True, "")  # (1, 77, D) each
        if delta is not None:
            positive = positive.clone()
            positive[:, pos:pos + len(cls)] += delta.to(positive.device, positive.dtype)  # Eq. 6
    shares = []
    for seed in range(seeds):
        generator = torch.Generator(bundle.device).manual_seed(seed)
        image = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=20,
                     guidance_scale=5.0, generator=generator).images[0]
        pixels = np.asarray(image, np.float32)  # (H, W, 3)
        objects = np.linalg.norm(pixels - np.array([110, 170, 90]), axis=-1) > 60
        near = np.linalg.norm(pixels - np.array(colour), axis=-1) < 70
        shares.append((near & objects).sum() / max(objects.sum(), 1))
    return float(np.mean(shares))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--random-arch", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--presets", default="quick,standard,thorough")
    parser.add_argument("--max-steps", type=int, default=None, help="run at most this many steps per preset and "
                                                                   "extrapolate the full time")
    parser.add_argument("--resolution", type=int, default=None,
                        help="--random-arch only: train at this size instead of 512 / 1024 (a CPU smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--class-word", default="dog")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--identity", default=None, metavar="R,G,B",
                        help="demo world: register a ball of this colour and measure Δ's effect on generation")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle, label = build_bundle(args)
    load_seconds = time.perf_counter() - started
    print(f"model: {label}  family {bundle.family}  device {bundle.device}  dtype {bundle.dtype}  "
          f"native {bundle.native_size}px  (built/loaded in {load_seconds:.1f}s)")
    if bundle.device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(bundle.device)}")
    rows = []
    identity = tuple(int(v) for v in args.identity.split(",")) if args.identity else None
    with tempfile.TemporaryDirectory() as folder:
        photos = ball_photos(Path(folder), identity) if identity else make_photos(Path(folder), bundle.native_size)
        if identity:
            args.class_word = "ball"
            print(f"identity: colour share without Δ {colour_share(bundle, identity, None):.3f}")
        for preset_name in args.presets.split(","):
            preset = PRESETS[preset_name]
            steps = min(preset.steps, args.max_steps) if args.max_steps else preset.steps
            library = SubjectLibrary(Path(folder) / f"lib-{preset_name}")
            stamps: list[float] = []
            if bundle.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            begin = time.perf_counter()
            register_subject(bundle, RegisterRequest("bench", args.class_word, photos, preset=preset_name), library,
                             on_progress=lambda p, stamps=stamps: stamps.append(time.perf_counter()),
                             overrides={"steps": steps, "checkpoint_every": 0})
            total = time.perf_counter() - begin
            per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0] - begin
            setup = total - per_step * steps
            stats = library.meta("bench")["stats"]
            size = (library.root / "bench" / "residuals.safetensors").stat().st_size
            peak = torch.cuda.max_memory_allocated() / 2**30 if bundle.device.type == "cuda" else float("nan")
            if identity:
                share = colour_share(bundle, identity, library.residuals("bench")["text_encoder"])
                print(f"identity: colour share with the {preset_name} Δ {share:.3f}")
            rows.append((preset_name, steps, preset.steps, total, per_step, setup + per_step * preset.steps,
                         stats["l_sub_eval_before"], stats["l_sub_eval_after"], stats["heldout_preservation_error"],
                         size, peak))
    print()
    print(f"{'preset':<9} {'steps':>5} {'of':>5} {'seconds':>8} {'s/step':>7} {'est.full s':>10} "
          f"{'L_sub before→after':>20} {'held-out err':>12} {'Δ bytes':>8} {'peak GiB':>8}")
    for name, steps, full, total, per_step, estimate, before, after, err, size, peak in rows:
        print(f"{name:<9} {steps:>5} {full:>5} {total:>8.2f} {per_step:>7.3f} {estimate:>10.1f} "
              f"{before:>9.4f}→{after:<9.4f} {err:>12.4f} {size:>8} {peak:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
