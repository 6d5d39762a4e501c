"""python -m studio bench: layout quality and speed on the demo world (evals/layout_bench.py); --speed: time against
vanilla diffusers (evals/speed_bench.py)."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from engines.types import GUIDANCE_ALIASES, GUIDANCE_MODES
from studio.cli.common import add_model_arguments, print_progress, studio_for
from studio.cli.generate import add_reference_arguments, reference_config

PARTS = ("layout", "subjects", "references", "relations")
DEFAULT_PARTS = ("layout", "subjects", "references")  # relations trains four LoRAs first: asked for by name
COLUMNS = (
    ("layout_iou", "layout IoU"),
    ("presence", "presence"),
    ("recognisable_presence", "presence (recognisable)"),
    ("colour_accuracy", "colour"),
    ("category_accuracy", "category"),
    ("layer_order_accuracy", "layer order"),
    ("seconds_per_image", "s/image"),
)


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="score layout guidance on the demo world's seeded layouts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="12 layouts instead of 60")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help="comma-separated parts to run: layout (guidance modes), subjects (a trained residual's identity), "
        "references (identity from photos: residual, references, adapter; 1 and 3 photos; 1 and 3 subjects), "
        "relations (learned relations: accuracy with and without their LoRA, identity, training time)",
    )
    parser.add_argument("--no-subjects", action="store_true", help="skip the subjects and references parts")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="score 60 other layouts, on which no default was ever chosen (seeds from 6,000,000)",
    )
    # SUPPRESS: these defaults depend on other options, so the help says them instead of "(default: None)"
    parser.add_argument(
        "--layouts", type=int, default=argparse.SUPPRESS, help="how many layouts (default: 60, 12 with --quick)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=argparse.SUPPRESS,
        help="take the layouts from this scene seed on (default: the bench's, 5,000,000)",
    )
    parser.add_argument(
        "--modes",
        default=argparse.SUPPRESS,
        help=f"comma-separated guidance modes to score: {', '.join(GUIDANCE_MODES)} (default: all; "
        "the older names none and cones2-public still work)",
    )
    parser.add_argument("--json", default=None, help="also write the full report here")
    add_reference_arguments(parser, switches=False)
    add_speed_arguments(parser)
    parser.set_defaults(func=run)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed (--speed)")
    speed.add_argument(
        "--speed",
        action="store_true",
        help="time Troupe's cases against vanilla diffusers' pipeline, interleaved: s/image, ratio, peak memory, "
        "operators per guided attention call, registration per preset (uses --model/--quantization/--dtype/--steps)",
    )
    speed.add_argument(
        "--random-arch",
        choices=("sd15", "sdxl", "demo"),
        default=None,
        help="full-size SD 1.5 / SDXL shapes with random weights (nothing downloaded), or the demo model",
    )
    speed.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    speed.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per case (default 2 after a warm-up; 1 and no warm-up for full-size shapes on a CPU)",
    )
    speed.add_argument(
        "--cases",
        default=None,
        help="comma-separated from all, vanilla, unguided, guided, bounded, fitted, quick-fit, references (default "
        "all; for full-size shapes on a CPU: vanilla, unguided, guided, bounded, quick-fit)",
    )
    speed.add_argument(
        "--register-presets",
        default=None,
        help="comma-separated; '' skips (default quick,standard,thorough; none for full-size shapes on a CPU)",
    )
    speed.add_argument(
        "--register-steps",
        type=int,
        default=2,
        help="training steps timed per preset, ≥ 2 (the rest extrapolated); 0: all",
    )


def markdown_table(report: dict) -> str:
    lines = [
        f"| guidance | objects | layouts | {' | '.join(title for _, title in COLUMNS)} |",
        "|" + "---|" * (3 + len(COLUMNS)),
    ]
    for mode, groups in report["modes"].items():
        for group, metrics in groups.items():
            if group == "all":
                continue
            cells = ["–" if metrics[key] is None else f"{metrics[key]:.2f}" for key, _ in COLUMNS]
            lines.append(f"| {mode_title(mode)} | {group.split()[0]} | {metrics['layouts']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def mode_title(name: str) -> str:
    """A guidance mode's title as the README's tables show it; the ceiling rows are named as they are."""
    mode = GUIDANCE_MODES.get(GUIDANCE_ALIASES.get(name, name))
    return mode.title if mode else name


def subjects_table(report: dict) -> str:
    lines = [
        "| prompt names | compositions | subject IoU | presence | identity (pattern + 2nd colour) | s/image |",
        "|---|---|---|---|---|---|",
    ]
    for row, metrics in report["rows"].items():
        lines.append(
            f"| {row} | {metrics['compositions']} | {metrics['subject_iou']:.2f} | {metrics['presence']:.2f} "
            f"| {metrics['identity']:.2f} | {metrics['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines)


def references_table(report: dict) -> str:
    lines = [
        "| subjects reach the picture by | photos | subjects per image | compositions | identity | confusion "
        "| subject IoU | presence | s/image | UNet calls/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, by_photos in report["rows"].items():
        for photos, by_kind in by_photos.items():
            for kind, m in by_kind.items():
                lines.append(
                    f"| {report['modes'][mode]} | {photos.split()[0]} | {kind.split()[0]} | {m['compositions']} "
                    f"| {m['identity']:.2f} | {m['confusion']:.2f} | {m['subject_iou']:.2f} | {m['presence']:.2f} "
                    f"| {m['seconds_per_image']:.2f} | {m['unet_calls_per_step']:.1f} |"
                )
    return "\n".join(lines)


def relations_table(report: dict) -> str:
    lines = ["| relation | how it is asked for | images | relation accuracy | both objects found | s/image |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for relation, result in report["relations"].items():
        for title, m in result["rows"].items():
            lines.append(f"| {relation} | {title} | {m['images']} | {m['accuracy']:.2f} | {m['found']:.2f} "
                         f"| {m['seconds_per_image']:.2f} |")  # fmt: skip
    lines += ["", "| relation | subject identity: no LoRA | LoRA | LoRA + keypoint loss | training s: LoRA | + keypoints |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for relation, result in report["relations"].items():
        identity, seconds = [m["identity"] for m in result["identity"].values()], result["training_seconds"]
        cells = [f"{v:.2f}" for v in identity] + [f"{seconds['lora']:.0f}", f"{seconds['lora-keypoints']:.0f}"]
        lines.append(f"| {relation} | {' | '.join(cells)} |")
    return "\n".join(lines)


def bench_parts(args: argparse.Namespace) -> tuple[str, ...]:
    from engines.types import InputError

    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise InputError(f"unknown bench part {', '.join(unknown) or '(none)'} (choose from {', '.join(PARTS)})")
    return tuple(p for p in parts if p == "layout" or not args.no_subjects)


def bench_options(args: argparse.Namespace):
    """The one place where the bench options become evals.layout_bench.BenchOptions."""
    from evals.common import BenchOptions

    chosen = {key: getattr(args, key) for key in ("layouts", "first_seed") if hasattr(args, key)}
    if hasattr(args, "modes"):
        chosen["modes"] = tuple(mode.strip() for mode in args.modes.split(","))
    return BenchOptions(
        quick=args.quick,
        steps=args.steps,
        cfg=args.cfg,
        subjects=not args.no_subjects,
        held_out=args.held_out,
        **chosen,
    )


def run_speed(args: argparse.Namespace) -> int:
    from engines.models import resolve_device
    from engines.types import REGISTER_PRESETS, InputError
    from evals.speed_bench import CASES, CPU_FULL_SIZE_CASES, SpeedOptions, run_speed_bench, speed_tables

    lean = args.random_arch in ("sd15", "sdxl") and resolve_device(args.device).type == "cpu"
    presets = _names(args.register_presets, () if lean else tuple(REGISTER_PRESETS))
    cases = _names(args.cases, CPU_FULL_SIZE_CASES if lean else tuple(CASES))
    cases = tuple(CASES) if cases == ("all",) else cases
    repeats = args.repeats if args.repeats is not None else 1 if lean else 2
    unknown = [p for p in presets if p not in REGISTER_PRESETS] + [c for c in cases if c not in CASES]
    if unknown or args.steps < 1 or repeats < 1 or args.register_steps == 1 or args.register_steps < 0:
        raise InputError(f"speed bench: steps and repeats ≥ 1, register steps 0 (all) or ≥ 2 (a step's time needs "
                         f"two), presets from {', '.join(REGISTER_PRESETS)}, cases from all, {', '.join(CASES)} "
                         f"(got {', '.join(unknown) or 'those'})")  # fmt: skip
    if lean and (args.cases is None or args.register_presets is None):
        print(f"full-size shapes on a CPU: cases {', '.join(cases)}, {repeats} run each, no warm-up, "
              f"registration {', '.join(presets) or 'skipped'} (--cases all and --register-presets for the rest)")  # fmt: skip
    options = SpeedOptions(
        model=args.model,
        random_arch=args.random_arch,
        size=args.size,
        steps=args.steps,
        repeats=repeats,
        quantization=args.quantization,
        dtype=args.dtype,
        device=args.device,
        register_presets=presets,
        register_steps=args.register_steps or None,
        compile=args.compile,
        cases=cases,
        warm_up=not lean or args.repeats is not None,
    )
    report = run_speed_bench(options)
    print(speed_tables(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _names(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if text is None else tuple(name.strip() for name in text.split(",") if name.strip())


def check_numbers(args: argparse.Namespace) -> None:
    """The numbers every bench uses, before any model loads: a bad one would otherwise stop it mid-run."""
    from engines.types.checks import finite, require, whole

    require(whole(args.steps, 1, 1000), f"bench: --steps must be an integer in 1..1000 (got {args.steps})")
    require(finite(args.cfg) and 0 <= args.cfg <= 50, f"bench: --cfg must be a number in 0..50 (got {args.cfg})")
    size_ok = args.size is None or whole(args.size, 64, 4096) and args.size % 8 == 0
    require(size_ok, f"bench: --size must be a multiple of 8 in 64..4096 (got {args.size})")
    layouts = getattr(args, "layouts", 1)  # only the layout bench reads it; a 0 is a mistake with --speed too
    require(whole(layouts, 1, 100_000), f"bench: --layouts must be an integer in 1..100000 (got {layouts})")


def run(args: argparse.Namespace) -> int:
    check_numbers(args)
    if args.speed:
        return run_speed(args)
    reference_config(args)  # the reference options checked now, not after the layout and subject parts have run
    options, parts, studio = bench_options(args), bench_parts(args), studio_for(args)
    progress = partial(print_progress, unit="image")
    report = {}
    if "layout" in parts:
        from evals.layout_bench import run_bench

        report = run_bench(studio, options, on_progress=progress)
        print(
            f"model {report['model']} ({report['family']}), {report['cases']} layouts ({report['layouts']}), "
            f"{report['steps']} steps, CFG {report['cfg']}"
        )
        print(markdown_table(report))
    if "subjects" in parts:
        from evals.subject_bench import run_subject_bench

        subjects = report["subjects"] = run_subject_bench(studio, options, on_progress=progress)
        print(
            f"\nsubjects {', '.join(subjects['subjects'])}: registered from {subjects['photos']} photos each "
            f"({subjects['preset']} preset, {subjects['registration_seconds']:.0f} s each), Troupe guidance"
        )
        print(subjects_table(subjects))
    if "references" in parts:
        from evals.reference_bench import run_reference_bench

        references = report["references"] = run_reference_bench(studio, options, reference_config(args), progress)
        adapter = "with" if references["adapter"] else "NO adapter loaded:"
        print(f"\nreferences ({adapter} reference adapter; {references['settings']}), {options.steps} steps")
        print(references_table(references))
    if "relations" in parts:
        from evals.relation_bench import run_relation_bench

        relations = report["relations"] = run_relation_bench(studio, options, progress)
        print(f"\nrelations: LoRAs from {relations['examples']} examples each, held-out colour pairs, "
              f"{options.steps} steps, CFG {options.cfg}")  # fmt: skip
        print(relations_table(relations))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
