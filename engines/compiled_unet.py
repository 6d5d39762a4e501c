"""`--compile`: the UNet's forward through torch.compile, for the steps where nothing backpropagates.

Why it pays on a GPU (issue 18): an SD 1.5 step at 512 px is launch-bound (~34 ms of small kernels per CFG step on an
H100), and guidance adds small kernels of its own; inductor fuses them and, with CUDA graphs ("reduce-overhead"),
replays the whole step with one launch. The region processors were written for it (kernels/region_attention.py:
no graph breaks, η(t) a tensor), so a request's new layout or a new step's η does not recompile; what does is a new
image size, a new batch size, guidance switched on or off, and the reference pass — each once per process.

Box fitting and registration backpropagate through the UNet: they run the eager forward, because a compiled
backward would be a second, long compilation for a few calls per image.
"""

from __future__ import annotations

import torch

COMPILE_BACKEND = "inductor"  # the tests swap in "aot_eager": the same graph capture, without minutes of C++ builds


class CompiledForward:
    """Stands in for `unet.forward`: the compiled graph without autograd, the module's own forward with it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.eager = unet.forward
        self.graphs = next(unet.parameters()).device.type == "cuda" and COMPILE_BACKEND == "inductor"
        mode = "reduce-overhead" if self.graphs else None  # CUDA graphs: one launch per step
        self.compiled = torch.compile(self.eager, backend=COMPILE_BACKEND, mode=mode, dynamic=False)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        if self.graphs:
            # each UNet call is a new step: the previous call's output (already read by the scheduler) may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


def compile_unet(unet: torch.nn.Module) -> None:
    """Compile once per loaded model; the graphs are built lazily, at the first image of each shape."""
    if not isinstance(unet.forward, CompiledForward):
        unet.forward = CompiledForward(unet)
