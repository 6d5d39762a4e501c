"""python -m studio register: a subject from 1–10 photos (Cones 2 residual embedding; the instant preset trains
nothing and keeps the photos for reference attention)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from engines.types import LIMITS, REGISTER_PRESETS, RegisterRequest
from studio.cli.common import add_library_argument, add_model_arguments, train_with_progress

HARDLY = 0.05  # a fall of less than 5 % of the loss on the photos: the residual barely moved the model


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help=f"register a subject from 1–{LIMITS.photos} photos (Cones 2 residual embedding, or instant: photos only)",
        formatter_class=_Formatter,
        epilog=presets_epilog(),
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
        help="how the subject is learned (the presets are listed below)",
    )
    parser.add_argument("--no-masks", action="store_true", help="do not weight the loss by the foreground mask")
    parser.add_argument("--seed", type=int, default=0)
    add_library_argument(parser)
    parser.set_defaults(func=run)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option, and the presets' list below them kept one preset a paragraph."""


def presets_epilog(width: int = 78) -> str:
    """Every preset with its `why`, so the help says what each one is for (not only how long it trains)."""
    lines = ["presets:"]
    for name, preset in REGISTER_PRESETS.items():
        steps = f" ({preset.steps} steps)" if preset.steps else ""
        text = textwrap.fill(preset.why, width, initial_indent=" " * 4, subsequent_indent=" " * 4)
        lines += [f"  {name}{steps}", text]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    request = RegisterRequest(
        name=args.name,
        class_word=args.class_word,
        photos=tuple(args.photos),
        preset=args.preset,
        use_masks=not args.no_masks,
        seed=args.seed,
    )
    print(preset_line(args.preset), file=sys.stderr, flush=True)
    info = train_with_progress(args, lambda studio, progress, cancel: studio.register(request, progress, cancel))
    trained = f"{info.steps} steps" if info.has_residual else "instant: no training"
    print(f"registered <{info.name}> ({info.class_word}, {info.family}, {trained}; {info.holds})")
    if info.photo_loss:
        print(loss_line(*info.photo_loss))
    return 0


def preset_line(name: str) -> str:
    """What the run is about to do, before the model loads: the default preset is several minutes on a laptop CPU."""
    preset = REGISTER_PRESETS[name]
    if not preset.steps:
        return f"preset {name}: no training (the photos and their masks are kept)"
    return (
        f"preset {name}: {preset.steps} steps (--preset {' | '.join(REGISTER_PRESETS)}; --help says what each is for)"
    )


def loss_line(before: float, after: float) -> str:
    """The denoising loss on the photos before and after training (same noise and timesteps both times): the one
    number that says whether the subject was learned."""
    change = (after - before) / before if before > 0 else 0.0
    verdict = "" if change <= -HARDLY else "; it hardly fell, so the subject may not be learned (docs/registration.md)"
    return f"loss on its photos: {before:.4f} before, {after:.4f} after ({change:+.0%}){verdict}"
