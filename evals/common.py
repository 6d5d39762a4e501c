"""What the benchmarks share: their options, the layout sets they draw from, and progress counting."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.types import GUIDANCE_MODES, InputError, StepProgress, guidance_mode

BENCH_SEED_OFFSET = 5_000_000  # far from the training scenes' seeds
# A second set of layouts on which no setting was ever chosen: the guidance and box-fitting settings were picked on
# the bench's own layouts, so this set tells whether they only fit those.
HELD_OUT_SEED_OFFSET = 6_000_000


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run scores: `modes` are names of engines.types.GUIDANCE_MODES (or their older aliases)."""

    quick: bool = False  # 12 layouts (and one subject) instead of 60 (and two)
    steps: int = 20
    cfg: float = 5.0
    modes: tuple[str, ...] = tuple(GUIDANCE_MODES)
    subjects: bool = True  # also the subject-identity part (evals/subject_bench.py)
    held_out: bool = False  # the layouts from HELD_OUT_SEED_OFFSET, on which no setting was chosen
    layouts: int | None = None  # how many (default 60, 12 when quick)
    first_seed: int | None = None  # the first scene seed (default the bench's)

    def __post_init__(self) -> None:
        for mode in self.modes:
            guidance_mode(mode, "bench mode")
        if self.layouts is not None and self.layouts < 1 or self.first_seed is not None and self.first_seed < 0:
            raise InputError("the bench needs at least 1 layout and a first seed ≥ 0")
        if self.held_out and self.first_seed is not None:
            raise InputError("held-out and a first seed name two different layout sets: choose one")

    @property
    def seed(self) -> int:
        if self.first_seed is not None:
            return self.first_seed
        return HELD_OUT_SEED_OFFSET if self.held_out else BENCH_SEED_OFFSET

    @property
    def count(self) -> int:
        return self.layouts or (12 if self.quick else 60)


class ImageCounter:
    """Counts finished images across modes and reports them as StepProgress."""

    def __init__(self, total: int, on_progress: Callable[[StepProgress], None] | None) -> None:
        self.total, self.done, self.on_progress = total, 0, on_progress
        self.started = time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(StepProgress(self.done, self.total, time.perf_counter() - self.started))


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase
