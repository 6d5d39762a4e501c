"""Where crowded layouts lose layout IoU: the scorer, the VAE, or the generation (the model and the guidance).

    python -m evals.crowded_misses                                   # 3-4 objects of the bench and held-out sets
    python -m evals.crowded_misses --mode troupe --layouts 60 --first-seed 7000000

For every object of every layout with 3-4 objects, the layout bench's IoU (requested box vs the detected box of the
object's colour, 0 when missing) is taken three times: on the exact render of the layout's scene, on that render
through the model's VAE, and on the generated image. The mean IoU lost then splits into
    1 − IoU(generated) = (1 − IoU(exact)) + (IoU(exact) − IoU(VAE)) + (IoU(VAE) − IoU(generated))
                         scorer             VAE                        generation (model + guidance)
and the generation's part into objects missing altogether and objects found at the wrong place or size. Objects are
also grouped by what makes a layout crowded: a box partly covered by a box in front, a small box, a box at the edge.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import numpy as np

from demo_world.scenes import random_scene
from engines.service import Studio
from engines.types import ModelSpec, guidance_mode
from evals.common import BENCH_SEED_OFFSET, HELD_OUT_SEED_OFFSET, BenchOptions
from evals.layout_bench import BenchCase, bench_cases, score, score_guidance

SMALL = 0.2  # a box side below this share of the canvas is small
EDGE = 0.03  # a box this close to the canvas's border is at the edge


@dataclass(frozen=True)
class ObjectIoU:
    exact: float
    vae: float
    generated: float
    covered: bool  # a box in front overlaps it
    small: bool
    edge: bool


def objects_of(case: BenchCase, exact, vae, generated) -> list[ObjectIoU]:
    regions = case.layout.regions
    rows = []
    for index, region in enumerate(regions):
        x0, y0, x1, y1 = region.box
        covered = any(other.layer > region.layer and _overlap(region.box, other.box) for other in regions)
        small = min(x1 - x0, y1 - y0) < SMALL
        edge = min(x0, y0, 1 - x1, 1 - y1) < EDGE
        ious = (exact.ious[index], vae.ious[index], generated.ious[index])
        rows.append(ObjectIoU(*ious, covered, small, edge))
    return rows


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def split(rows: list[ObjectIoU]) -> dict[str, float]:
    """Mean IoU lost to each part (they add up to 1 − mean generated IoU)."""

    def mean(values) -> float:
        return round(statistics.fmean(values), 3) if rows else float("nan")

    return {
        "objects": len(rows),
        "generated IoU": mean(r.generated for r in rows),
        "lost: scorer": mean(1 - r.exact for r in rows),
        "lost: VAE": mean(r.exact - r.vae for r in rows),
        "lost: generation, object missing": mean(r.vae if r.generated == 0 else 0.0 for r in rows),
        "lost: generation, place or size": mean(r.vae - r.generated if r.generated > 0 else 0.0 for r in rows),
    }


def crowded_rows(studio: Studio, mode: str, count: int, first_seeds: list[int]) -> list[ObjectIoU]:
    options = BenchOptions(subjects=False)
    rows = []
    for first in first_seeds:
        for case in (c for c in bench_cases(count, first) if len(c.layout.regions) > 2):
            scene = random_scene(case.seed).image
            exact, vae = score(scene, case, 0.0), score(studio.vae_roundtrip(scene), case, 0.0)
            (generated,) = score_guidance(studio, [case], guidance_mode(mode).config, options)
            rows += objects_of(case, exact, vae, generated)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--mode", default="troupe-quick-fit", help="a guidance mode of `python -m studio bench`")
    parser.add_argument("--layouts", type=int, default=60, help="layouts per set (those with 3-4 objects are used)")
    parser.add_argument("--first-seed", type=int, action="append", help="a layout set (default: bench and held-out)")
    args = parser.parse_args(argv)
    seeds = args.first_seed or [BENCH_SEED_OFFSET, HELD_OUT_SEED_OFFSET]
    rows = crowded_rows(Studio(ModelSpec(args.model)), args.mode, args.layouts, seeds)
    groups = {
        "all": rows,
        "covered by a box in front": [r for r in rows if r.covered],
        "not covered": [r for r in rows if not r.covered],
        f"small (side < {SMALL:g})": [r for r in rows if r.small],
        f"at the edge (< {EDGE:g})": [r for r in rows if r.edge],
    }
    table = {name: split(group) for name, group in groups.items() if group}
    keys = list(next(iter(table.values())))
    print(f"mode {args.mode}, layouts {seeds} × {args.layouts}, objects of layouts with 3-4 objects")
    print("| objects of | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(str(np.round(values[k], 3)) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
