"""python -m studio register: a subject from 1–10 photos (Cones 2 residual embedding)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from engines.types import LIMITS, REGISTER_PRESETS, RegisterRequest
from studio.cli.common import add_library_argument, add_model_arguments, print_progress, studio_for


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help=f"register a subject from 1–{LIMITS.photos} photos (Cones 2 residual embedding)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Ctrl-C stops between two steps and keeps a checkpoint: the same command again resumes.",
    )
    add_model_arguments(parser)
    parser.add_argument("--name", required=True, help="the subject's name: use it as <name> in prompts")
    parser.add_argument("--class", dest="class_word", required=True, help="what it is: dog, mug, toy, ...")
    parser.add_argument("photos", nargs="+", help=f"1–{LIMITS.photos} photos (PNG, JPEG or WebP)")
    parser.add_argument(
        "--preset",
        choices=list(REGISTER_PRESETS),
        default="standard",
        help="; ".join(f"{name}: {preset.steps} steps" for name, preset in REGISTER_PRESETS.items()),
    )
    parser.add_argument("--no-masks", action="store_true", help="do not weight the loss by the foreground mask")
    parser.add_argument("--seed", type=int, default=0)
    add_library_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    request = RegisterRequest(
        name=args.name,
        class_word=args.class_word,
        photos=tuple(args.photos),
        preset=args.preset,
        use_masks=not args.no_masks,
        seed=args.seed,
    )
    studio = studio_for(args)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # stop between steps, keep a checkpoint
    try:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        info = studio.register(request, on_progress=print_progress, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"registered <{info.name}> ({info.class_word}, {info.family}, {info.steps} steps)")
    return 0
