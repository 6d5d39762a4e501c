"""Score layout-guidance settings on the demo world's bench layouts: the data behind GuidanceConfig's defaults.

    python -m evals.sweep_guidance                       # the default grid, 24 layouts, demo model
    python -m evals.sweep_guidance --cases 60 --strength 0.08,0.3 --background 0,-1e8 --fraction 1,0.6

Every combination of --strength × --inside × --background × --fraction runs on the same seeded layouts as
`python -m studio bench`; one row per setting: layout IoU, presence and layer order for 1-2 and 3-4 objects.
"""

from __future__ import annotations

import argparse
import itertools

from engines.service import Studio
from engines.types import GuidanceConfig, ModelSpec
from evals.common import BenchOptions
from evals.layout_bench import bench_cases, score_guidance, summarise


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--strength", type=floats, default=[0.0, 0.08, 0.3, 1.0])
    parser.add_argument("--inside", type=floats, default=[2.5])
    parser.add_argument("--background", type=floats, default=[0.0, -1e8])
    parser.add_argument("--fraction", type=floats, default=[1.0])
    args = parser.parse_args()
    studio = Studio(ModelSpec(args.model))
    options = BenchOptions(steps=args.steps, cfg=args.cfg)
    cases = bench_cases(args.cases)
    print(
        "| strength | inside | background | fraction | IoU 1-2 | presence 1-2 | recognisable presence 1-2 | "
        "IoU 3-4 | presence 3-4 | layer order |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for strength, inside, background, fraction in itertools.product(
        args.strength, args.inside, args.background, args.fraction
    ):
        guidance = GuidanceConfig(
            strength=strength, inside_weight=inside, background_weight=background, guided_fraction=fraction
        )
        report = summarise(score_guidance(studio, cases, guidance, options))
        few, many = report.get("1-2 objects", {}), report.get("3-4 objects", {})
        cells = [
            few.get("layout_iou"),
            few.get("presence"),
            few.get("recognisable_presence"),
            many.get("layout_iou"),
            many.get("presence"),
            report["all"]["layer_order_accuracy"],
        ]
        text = " | ".join("–" if v is None else f"{v:.2f}" for v in cells)
        print(f"| {strength:g} | {inside:g} | {background:g} | {fraction:g} | {text} |", flush=True)


if __name__ == "__main__":
    main()
