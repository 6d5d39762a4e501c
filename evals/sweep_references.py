"""Score reference settings on the reference bench's scenes: the data behind ReferenceConfig's defaults.

    python -m evals.sweep_references --reference-adapter FILE --strength 1,2 --image-guidance 0,3
    python -m evals.sweep_references --held-out ...      # confirm a choice on scenes where nothing was chosen

Every combination of --strength × --image-guidance × --start-strength runs the bench's --mode (instant subjects
from --photos photos, by default) on the same seeded scenes; one row per setting.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

from engines.service import Studio
from engines.types import ModelSpec, ReferenceConfig
from evals.common import BenchOptions
from evals.reference_bench import MODES, run_reference_bench


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--reference-adapter", default="auto")
    parser.add_argument("--mode", choices=list(MODES), default="references+adapter")
    parser.add_argument("--photos", type=int, default=1)
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--strength", type=floats, default=[1.0, 2.0])
    parser.add_argument("--image-guidance", type=floats, default=[0.0])
    parser.add_argument("--start-strength", type=floats, default=[1.0], help="below 1: a collage start")
    args = parser.parse_args()
    studio = Studio(ModelSpec(args.model, reference_adapter=args.reference_adapter))
    options = BenchOptions(held_out=args.held_out)
    print("| strength | image guidance | start | kind | identity | confusion | subject IoU | presence | s/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for strength, guidance, start in itertools.product(args.strength, args.image_guidance, args.start_strength):
        config = replace(ReferenceConfig(strength=strength, image_guidance=guidance),
                         start="collage" if start < 1 else "noise", start_strength=start)  # fmt: skip
        report = run_reference_bench(studio, options, config, modes=(args.mode,), photo_counts=(args.photos,))
        for kind, m in next(iter(report["rows"][args.mode].values())).items():
            print(f"| {strength:g} | {guidance:g} | {start:g} | {kind} | {m['identity']:.2f} | {m['confusion']:.2f} "
                  f"| {m['subject_iou']:.2f} | {m['presence']:.2f} | {m['seconds_per_image']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
