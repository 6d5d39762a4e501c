"""python -m studio bench: layout quality and speed on the demo world (see engines/bench.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines.types import StepProgress
from studio.cli_generate import add_model_arguments, model_spec

COLUMNS = (("layout_iou", "layout IoU"), ("presence", "presence"),
           ("recognisable_presence", "presence (recognisable)"), ("colour_accuracy", "colour"),
           ("category_accuracy", "category"), ("layer_order_accuracy", "layer order"),
           ("seconds_per_image", "s/image"))


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="score layout guidance on the demo world's seeded layouts",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="12 layouts instead of 60")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--no-subjects", action="store_true",
                        help="skip the subject identity part (it registers 1-2 subjects first)")
    parser.add_argument("--held-out", action="store_true",
                        help="score 60 other layouts, on which no default was ever chosen (seeds from 6,000,000)")
    # SUPPRESS: these defaults depend on other options, so the help says them instead of "(default: None)"
    parser.add_argument("--layouts", type=int, default=argparse.SUPPRESS,
                        help="how many layouts (default: 60, 12 with --quick)")
    parser.add_argument("--first-seed", type=int, default=argparse.SUPPRESS,
                        help="take the layouts from this scene seed on (default: the bench's, 5,000,000)")
    parser.add_argument("--modes", default=argparse.SUPPRESS,
                        help="comma-separated guidance modes to score: none, cones2-public, troupe, troupe-fitted "
                             "(default: all)")
    parser.add_argument("--json", default=None, help="also write the full report here")
    parser.set_defaults(func=run)


def markdown_table(report: dict) -> str:
    lines = [f"| guidance | objects | layouts | {' | '.join(title for _, title in COLUMNS)} |",
             "|" + "---|" * (3 + len(COLUMNS))]
    for mode, groups in report["modes"].items():
        for group, metrics in groups.items():
            if group == "all":
                continue
            cells = ["–" if metrics[key] is None else f"{metrics[key]:.2f}" for key, _ in COLUMNS]
            lines.append(f"| {mode} | {group.split()[0]} | {metrics['layouts']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def subjects_table(report: dict) -> str:
    lines = ["| prompt names | compositions | subject IoU | presence | identity (pattern + 2nd colour) | s/image |",
             "|---|---|---|---|---|---|"]
    for row, metrics in report["rows"].items():
        lines.append(f"| {row} | {metrics['compositions']} | {metrics['subject_iou']:.2f} | {metrics['presence']:.2f} "
                     f"| {metrics['identity']:.2f} | {metrics['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def print_progress(progress: StepProgress) -> None:
    end = "\n" if progress.step == progress.total else "\r"
    print(f"image {progress.step}/{progress.total}  eta {progress.eta:5.0f}s", end=end, file=sys.stderr, flush=True)


def modes(args: argparse.Namespace) -> list[str] | None:
    """The --modes list, or None for all of them."""
    return [mode.strip() for mode in args.modes.split(",")] if hasattr(args, "modes") else None


def run(args: argparse.Namespace) -> int:
    from engines.service import Studio

    report = Studio(model_spec(args)).bench(quick=args.quick, steps=args.steps, cfg=args.cfg,
                                            subjects=not args.no_subjects, held_out=args.held_out,
                                            layouts=getattr(args, "layouts", None),
                                            first_seed=getattr(args, "first_seed", None), modes=modes(args),
                                            on_progress=print_progress)
    print(f"model {report['model']} ({report['family']}), {report['cases']} layouts ({report['layouts']}), "
          f"{report['steps']} steps, CFG {report['cfg']}")
    print(markdown_table(report))
    if "subjects" in report:
        subjects = report["subjects"]
        print(f"\nsubjects {', '.join(subjects['subjects'])}: registered from {subjects['photos']} photos each "
              f"({subjects['preset']} preset, {subjects['registration_seconds']:.0f} s each), Troupe guidance")
        print(subjects_table(subjects))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
