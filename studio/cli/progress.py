"""The command line's progress line on stderr, and an ETA that is not thrown off by the first step."""

from __future__ import annotations

import sys
from collections import deque

from engines.types import StepProgress

WINDOW = 20  # steps the ETA averages over: recent enough to follow a machine that gets busier or quieter


class EtaClock:
    """Seconds left, from the time the last WINDOW steps took. The first step of a run pays for warm-up (lazy
    loading, kernel selection, memory allocation): StepProgress.eta spreads it over every step, so a 300-step
    registration whose first step took 9 s first said 44 minutes. Here the first step's own time is never used, and
    there is no ETA until a second step has been seen. A step number that does not go up starts a new run."""

    def __init__(self, window: int = WINDOW):
        self.seen: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, elapsed) of the latest reports
        self.total = 0

    def eta(self, progress: StepProgress) -> float | None:
        if self.seen and (progress.step <= self.seen[-1][0] or progress.total != self.total):
            self.seen.clear()
        self.total = progress.total
        self.seen.append((progress.step, progress.elapsed))
        (first_step, first_time), (step, elapsed) = self.seen[0], self.seen[-1]
        if step == first_step:
            return None
        per_step = (elapsed - first_time) / (step - first_step)
        return max(per_step, 0.0) * (progress.total - step)


_clock = EtaClock()  # the CLI runs one job at a time


def print_progress(progress: StepProgress, unit: str = "step") -> None:
    """One line on stderr, rewritten in place: `step 3/20  loss 0.1234  1.2s  eta 6.8s` (`eta ?` at first)."""
    end = "\n" if progress.step == progress.total else "\r"
    loss = f"  loss {progress.loss:.4f}" if progress.loss is not None else ""
    seconds = _clock.eta(progress)
    eta = f"{seconds:5.1f}s" if seconds is not None else "    ? "
    print(
        f"{unit} {progress.step}/{progress.total}{loss}  {progress.elapsed:5.1f}s  eta {eta} ",
        end=end,
        file=sys.stderr,
        flush=True,
    )
