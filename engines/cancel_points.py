"""Stop inside a step's work, not only between steps.

The pipeline's step callback sees a cancel only once a step has ended, and one step of a big job is long: eight
512² images on a CPU take seconds per step, and the VAE decodes them all after the last one (issue 20: Stop pressed
at 15 s, the job ended at 72.6 s while another visitor waited). So every block of the UNet and of the VAE's decoder
asks the flag before it runs (a forward pre-hook: a few microseconds, a dozen times per step) and raises Cancelled.

What the hooks raise unwinds through the same `finally` blocks as a cancel between steps: processors, hooks, the
scheduler and the LoRAs go back as they were, and nothing has been written yet.

A UNet run through torch.compile (engines/compiled_unet.py) keeps only the check before the whole UNet call: a hook
inside the compiled graph would read a Python threading.Event, which dynamo cannot trace (a graph break per block).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engines.types import Cancelled


def block_modules(pipe, compiled: bool) -> list[torch.nn.Module]:
    """Where a cancel is noticed: the UNet's down, mid and up blocks (or only the whole UNet when compiled) and the
    VAE decoder's up blocks."""
    unet = pipe.unet
    inside = [] if compiled else [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    decoder = getattr(pipe.vae, "decoder", None)
    return [unet, *[m for m in inside if m is not None], *(decoder.up_blocks if decoder is not None else [])]


@contextmanager
def cancel_points(modules: list[torch.nn.Module], cancel: threading.Event | None) -> Iterator[None]:
    """While inside, each of `modules` raises Cancelled before it runs once `cancel` is set."""
    if cancel is None:
        yield
        return

    def check(_module, _args) -> None:
        if cancel.is_set():
            raise Cancelled()

    hooks = [module.register_forward_pre_hook(check) for module in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
