"""Peak memory of one guided UNet call with bounded self-attention (issue 20), full-size SD 1.5, random weights.

    OMP_NUM_THREADS=1 taskset -c 1 python -m evals.bounded_memory --size 1024          # the chunked bound
    OMP_NUM_THREADS=1 taskset -c 1 python -m evals.bounded_memory --size 1024 --old    # the precomputed (N, N) bias

Builds the SD 1.5 UNet (evals/random_models.py's config, fp32, CPU), two regions, CFG (batch 2), installs the
region processors with the self bound, and runs one UNet call. `--old` sets PRECOMPUTED_MAX_CELLS so high that every
layer takes the precomputed (B, 1, N, N) bias, as before issue 20. Prints the process's peak RSS, its growth over
the model alone (build_maps + prepare + the call), and the call's time. One call per process: ru_maxrss never drops.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from engines.layout import build_maps
from engines.types import GuidanceConfig, Layout, Region
from evals.random_models import UNETS
from kernels import bounded_self_attention
from kernels.region_attention import GuidanceState, install

LAYOUT = Layout((Region("dog", (0.05, 0.3, 0.5, 0.9)), Region("cat", (0.45, 0.2, 0.95, 0.8), layer=1)))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--old", action="store_true", help="force the precomputed (N, N) bias at every layer")
    args = parser.parse_args()
    if args.old:
        bounded_self_attention.PRECOMPUTED_MAX_CELLS = 2**62
    from diffusers import UNet2DConditionModel

    side = args.size // 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=side, **UNETS["sd15"]).eval()
    sample = torch.randn(2, 4, side, side)  # (B, 4, h, w): CFG, [unconditional, conditional]
    context = torch.randn(2, 77, UNETS["sd15"]["cross_attention_dim"])  # (B, T, 768)
    model_mb = peak_mb()
    config = GuidanceConfig(bound_self_attention=True)
    maps = build_maps(LAYOUT, [[5], [7]], 77, (side, side), len(unet.config.block_out_channels), config)
    state = GuidanceState(maps, images=1)
    state.prepare(torch.device("cpu"), torch.float32)
    state.set_time_scale(0.3)
    install(unet, state, bound_self_attention=True)
    start = time.perf_counter()
    with torch.no_grad():
        unet(sample, torch.tensor(900), context)
    seconds = time.perf_counter() - start
    path = "old (precomputed bias)" if args.old else "new (chunked above 4096 cells)"
    print(f"size {args.size}² (latent {side}²), batch 2, {path}")
    print(f"peak RSS {peak_mb():.0f} MB; model alone {model_mb:.0f} MB; growth {peak_mb() - model_mb:.0f} MB")
    print(f"one UNet call {seconds:.1f} s")


if __name__ == "__main__":
    main()
