"""Stop inside a step's work, not only between steps.

The pipeline's step callback sees a cancel only once a step has ended, and one step of a big job is long: eight
512² images on a CPU take seconds per step, and the VAE decodes them all after the last one (issue 20: Stop pressed
at 15 s, the job ended at 72.6 s while another visitor waited). So every block of the UNet and of the VAE's decoder
asks the flag before it runs (a forward pre-hook: a few microseconds, a dozen times per step) and raises Cancelled.

What the hooks raise unwinds through the same `finally` blocks as a cancel between steps: processors, hooks, the
scheduler and the LoRAs go back as they were, and nothing has been written yet.

On a CPU one block can itself take most of a step: the demo model's first self-attention at 512² reads 16,384 cells
for each of 16 rows (8 images, CFG), tens of seconds on one core, so with block checks alone Stop still took 70 s
(evals/cancel_latency.py). There each self-attention over more than CHUNK_ROWS cells of diffusers' own processor runs
in chunks of query rows, asking the flag between chunks: every query row attends to all the keys either way, so the
result is the same, and on a CPU bit for bit (tests/engines/test_cancel_points.py compares the images); the keys are
projected once per chunk, which costs little beside the N² attention. On a GPU such a call takes milliseconds, and the
block checks are enough.

A UNet run through torch.compile (engines/compiled_unet.py) keeps only the check before the whole UNet call: a hook
inside the compiled graph would read a Python threading.Event, which dynamo cannot trace (a graph break per block).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
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


CHUNK_ROWS = 2048  # query rows per chunk: 8 checks per call at 512² on the demo model, none at its native 64²


class ChunkedSelfAttention:
    """Wraps one of diffusers' self-attention processors: above CHUNK_ROWS cells, the call in chunks of query rows
    (keys and values from every cell), with a cancel check before each chunk."""

    def __init__(self, inner: Callable, cancel: threading.Event) -> None:
        self.inner, self.cancel = inner, cancel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        plain = attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        cells = hidden_states.shape[1] if hidden_states.ndim == 3 else 0  # (B, N, C)
        if encoder_hidden_states is not None or attention_mask is not None or not plain or cells <= CHUNK_ROWS:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        chunks = []
        for start in range(0, cells, CHUNK_ROWS):
            if self.cancel.is_set():
                raise Cancelled()
            rows = hidden_states[:, start : start + CHUNK_ROWS]  # (B, n, C) queries; keys from all N cells
            chunks.append(self.inner(attn, rows, hidden_states, None, temb, **kwargs))
        return torch.cat(chunks, dim=1)  # (B, N, C)


@contextmanager
def chunked_self_attention(unet, cancel: threading.Event | None) -> Iterator[None]:
    """On a CPU, diffusers' own self-attention processors (not Troupe's region or reference ones, which read the
    whole call) are wrapped for the duration; the previous processors come back afterwards."""
    previous = dict(unet.attn_processors)
    ours = {name: p for name, p in previous.items() if name.endswith("attn1.processor") and _is_diffusers(p)}
    if cancel is None or unet.device.type != "cpu" or not ours:
        yield
        return
    unet.set_attn_processor({**previous, **{n: ChunkedSelfAttention(p, cancel) for n, p in ours.items()}})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def _is_diffusers(processor) -> bool:
    return type(processor).__module__.startswith("diffusers.")


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
