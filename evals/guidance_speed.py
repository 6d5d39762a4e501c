"""Time cost of layout guidance over the unguided run, same model, seed, steps and size.

    python -m evals.guidance_speed                                   # the demo model
    python -m evals.guidance_speed --model path/to/diffusers_folder
    python -m evals.guidance_speed --random-arch sd15 --size 512      # full-size SD 1.5 shapes, random weights
    python -m evals.guidance_speed --random-arch sdxl --size 1024 --steps 20

Prints seconds per image for: no layout; two regions (forward guidance); two regions with self-attention
bounded; the public Cones 2 settings; box fitting and quick box fitting (also with three regions, where it reads more
layers) — and each one's overhead over the unguided run. Median of --repeats runs per case after a warm-up of each; the
cases take turns, so drift and warm-up hit them all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from engines.generate import Generator
from engines.models import ModelBundle, load_model, resolve_device
from engines.types import GUIDANCE_MODES, GenerateRequest, GuidanceConfig, Layout, ModelSpec, Region
from evals.random_models import random_bundle

PROMPT = "a photo of dog and cat on the beach"
LAYOUT = Layout((Region("dog", (0.05, 0.3, 0.5, 0.9)), Region("cat", (0.45, 0.2, 0.95, 0.8), layer=1)))
CROWDED = Layout(LAYOUT.regions + (Region("beach", (0.0, 0.7, 1.0, 1.0)),))  # quick fitting reads more layers
CASES = {
    "no layout": (Layout(), GuidanceConfig()),
    "2 regions, forward guidance": (LAYOUT, GuidanceConfig()),
    "2 regions, + bounded self-attention": (LAYOUT, GuidanceConfig(bound_self_attention=True)),
    "2 regions, Cones 2 public settings": (LAYOUT, GuidanceConfig.cones2_public()),
    "2 regions, + box fitting": (LAYOUT, GUIDANCE_MODES["troupe-fitted"].config),
    "2 regions, + quick box fitting": (LAYOUT, GUIDANCE_MODES["troupe-quick-fit"].config),
    "3 regions, + quick box fitting": (CROWDED, GUIDANCE_MODES["troupe-quick-fit"].config),
}


def bundle_for(args) -> ModelBundle:
    if args.random_arch:
        return random_bundle(args.random_arch, resolve_device(), args.size)
    return load_model(ModelSpec(args.model))


@dataclass(frozen=True)
class Timing:
    seconds: float  # median of the timed runs
    peak_mb: float  # the highest peak of any run of the case: CUDA memory allocated, or the process's RSS on a CPU


def time_cases(generator: Generator, requests: dict[str, GenerateRequest], repeats: int) -> dict[str, float]:
    """Median seconds per case. The cases take turns (round robin), so warm-up and drift hit them all alike."""
    calls = {name: partial(generator, request) for name, request in requests.items()}
    return {name: timing.seconds for name, timing in time_calls(calls, repeats).items()}


def time_calls(calls: dict[str, Callable[[], object]], repeats: int, warm_up: bool = True) -> dict[str, Timing]:
    """Median seconds and peak memory per case, the cases taking turns (after a warm-up of each, unless told not)."""

    def once(call: Callable[[], object]) -> tuple[float, float]:
        reset_peak_memory()
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started, peak_memory_mb()

    for call in calls.values() if warm_up else ():
        once(call)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(once(call))
    return {
        name: Timing(statistics.median(s for s, _ in values), max(m for _, m in values))
        for name, values in samples.items()
    }


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's RSS high-water mark (clear_refs 5)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak is the process's since it started (getrusage)


def peak_memory_mb() -> float:
    """MiB: CUDA memory allocated at its peak, or the process's peak RSS since the last reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--random-arch", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (the model's native size if omitted)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = bundle_for(args)
    generator = Generator(bundle)
    device = (
        torch.cuda.get_device_name() if bundle.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    size = args.size or bundle.native_size
    print(f"model {bundle.spec.source} ({bundle.family}), {size}×{size}, {args.steps} steps, CFG on, {device}")
    requests = {
        name: GenerateRequest(
            PROMPT, layout=layout, guidance=guidance, seed=0, steps=args.steps, width=size, height=size
        )
        for name, (layout, guidance) in CASES.items()
    }
    seconds = time_cases(generator, requests, args.repeats)
    baseline = seconds["no layout"]
    for name, value in seconds.items():
        print(f"{name:38s} {value:8.3f} s/image   overhead {100 * (value / baseline - 1):+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
