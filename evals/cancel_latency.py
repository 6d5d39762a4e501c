"""How long Stop takes to end a big job: the issue-20 case (demo model, 512×512, 8 images, Stop pressed at 15 s).

    OMP_NUM_THREADS=1 python -m evals.cancel_latency [--size 512] [--images 8] [--stop-at 15] [--checks steps]

prints the seconds from Stop to the job's end. `--checks` picks where the cancel is noticed: `steps` is the old
behaviour (only the step callback: engines/cancel_points.py left out), `blocks` adds the checks before every UNet and
decoder block, `chunks` (the default, what generation does) also those between chunks of a CPU self-attention call.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

from engines.service import Studio
from engines.types import Cancelled, GenerateRequest, ModelSpec

CHECKS = ("steps", "blocks", "chunks")  # each adds places where a cancel is noticed to the one before


def stop_latency(size: int, images: int, stop_at: float, steps: int) -> dict:
    studio = Studio(ModelSpec("demo"))
    studio.model_info()  # load first: the clock times the job only
    cancel, ended = threading.Event(), {}
    request = GenerateRequest("a red ball next to a blue box", seed=1, steps=steps, num_images=images,
                              width=size, height=size)  # fmt: skip

    def job() -> None:
        try:
            studio.generate(request, cancel=cancel)
            ended["how"] = "finished"
        except Cancelled:
            ended["how"] = "cancelled"
        ended["at"] = time.perf_counter()

    thread = threading.Thread(target=job)
    started = time.perf_counter()
    thread.start()
    thread.join(stop_at)
    pressed = time.perf_counter()
    cancel.set()
    thread.join()
    return {"stop_pressed_s": round(pressed - started, 1), "ended": ended["how"],
            "stop_to_end_s": round(ended["at"] - pressed, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stop-at", type=float, default=15.0)
    parser.add_argument("--checks", choices=CHECKS, default="chunks", help="where Stop is noticed (steps: the old way)")
    args = parser.parse_args(argv)
    import engines.generate

    if CHECKS.index(args.checks) < CHECKS.index("blocks"):
        engines.generate.cancel_points = lambda modules, cancel: contextlib.nullcontext()
    if CHECKS.index(args.checks) < CHECKS.index("chunks"):
        engines.generate.chunked_self_attention = lambda unet, cancel: contextlib.nullcontext()
    print(stop_latency(args.size, args.images, args.stop_at, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
