"""python -m studio generate: one picture (or a batch) from a prompt and a layout of boxes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.types import (
    DTYPES,
    OFFLOADS,
    QUANTIZATIONS,
    SCHEDULERS,
    GenerateRequest,
    GuidanceConfig,
    InputError,
    Layout,
    ModelSpec,
    Region,
    StepProgress,
)

GUIDANCE_PRESETS = {"troupe": GuidanceConfig, "cones2": GuidanceConfig.cones2_public, "off": GuidanceConfig.off}


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate images from a prompt and boxes",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the picture; <name> stands for a registered subject")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--box", action="append", default=[], metavar="WORDS=x0,y0,x1,y1[@layer]",
                        help="a region: words of the prompt (or <name>) and a box in [0,1]; later boxes are in front "
                             "unless @layer says otherwise")
    parser.add_argument("--seed", type=int, default=None, help="random if omitted (it is printed)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="default")
    parser.add_argument("--width", type=int, default=None, help="the model's native size if omitted")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--guidance", choices=sorted(GUIDANCE_PRESETS), default="troupe",
                        help="troupe: Troupe's default; cones2: the public Cones 2 code; off: no layout guidance")
    parser.add_argument("--strength", type=float, default=None, help="override the guidance strength")
    parser.add_argument("--bound-self-attention", action="store_true", help="keep regions apart in self-attention too")
    parser.add_argument("--fit-boxes", action="store_true",
                        help="draw objects at their boxes' size (box fitting: 2-4x slower)")
    parser.add_argument("--library", default=None, help="subject library folder (default ~/.troupe/library)")
    parser.add_argument("--out", default="outputs/troupe.png", help="PNG path; a batch gets -1, -2, ... suffixes")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="demo, a Hub id, a diffusers folder or a .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    parser.add_argument("--offload", choices=OFFLOADS, default="none")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model, dtype=args.dtype, quantization=args.quantization, offload=args.offload,
                     device=args.device)


def parse_box(text: str, order: int) -> Region:
    """'red ball=0.1,0.2,0.5,0.9@1' → Region; '<rex>=...' binds the subject rex."""
    words, sep, rest = text.rpartition("=")
    if not sep or not words.strip():
        raise InputError(f"--box '{text}': write WORDS=x0,y0,x1,y1[@layer]")
    numbers, _, layer = rest.partition("@")
    try:
        box = tuple(float(v) for v in numbers.split(","))
        layer_index = int(layer) if layer else order
    except ValueError:
        raise InputError(f"--box '{text}': the box must be four numbers and the layer an integer") from None
    words = words.strip()
    if words.startswith("<") and words.endswith(">"):
        return Region(phrase="", box=box, subject=words[1:-1], layer=layer_index)
    return Region(phrase=words, box=box, layer=layer_index)


def build_request(args: argparse.Namespace) -> GenerateRequest:
    guidance = GUIDANCE_PRESETS[args.guidance]()
    if args.strength is not None or args.bound_self_attention:
        strength = guidance.strength if args.strength is None else args.strength
        guidance = GuidanceConfig(**{**guidance.__dict__, "strength": strength,
                                     "bound_self_attention": args.bound_self_attention})
    if args.fit_boxes:
        guidance = guidance.fitted()
    layout = Layout(tuple(parse_box(text, i) for i, text in enumerate(args.box)))
    return GenerateRequest(prompt=args.prompt, negative_prompt=args.negative, layout=layout, seed=args.seed,
                           steps=args.steps, cfg=args.cfg, scheduler=args.scheduler, width=args.width,
                           height=args.height, num_images=args.num_images, guidance=guidance)


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InputError(f"--out {out}: Troupe writes PNG files (they carry the settings)")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k + 1}{path.suffix}") for k in range(count)]


def print_progress(progress: StepProgress) -> None:
    end = "\n" if progress.step == progress.total else "\r"
    print(f"step {progress.step}/{progress.total}  {progress.elapsed:5.1f}s  eta {progress.eta:4.1f}s",
          end=end, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from engines.metadata import save_png
    from engines.service import Studio

    request = build_request(args)
    paths = output_paths(args.out, request.num_images)
    result = Studio(model_spec(args), args.library).generate(request, on_progress=print_progress)
    for image, seed, path in zip(result.images, result.seeds, paths):
        save_png(image, path)
        print(f"{path}  seed {seed}")
    print(f"{result.timings['total']:.2f}s", file=sys.stderr)
    return 0
