"""Stop inside a step's work (engines/cancel_points.py): a cancel set in the middle of a UNet call or of the VAE's
decoding ends the job at the next block, leaves the model as it was, and the next job is the same as a fresh one."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engines.cancel_points import ChunkedSelfAttention, block_modules
from engines.generate import Generator
from engines.types import Cancelled, GenerateRequest, GuidanceConfig, Layout, Region

LAYOUT = Layout((Region("dog", (0.0, 0.0, 0.5, 1.0)), Region("cat", (0.5, 0.0, 1.0, 1.0), layer=1)))
REQUEST = GenerateRequest("a photo of dog and cat", layout=LAYOUT, seed=7, steps=3, num_images=2,
                          guidance=GuidanceConfig(bound_self_attention=True))  # fmt: skip


def hooks_left(pipe) -> int:
    modules = [pipe.unet, *pipe.unet.modules(), *pipe.vae.modules()]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def blocks_run_after(cancel: threading.Event, trigger, watched) -> list[str]:
    """Set `cancel` when `trigger` has run; the names of the `watched` blocks that still ran to their end afterwards."""
    ran: list[str] = []
    handles = [trigger.register_forward_hook(lambda *_: cancel.set())]
    for name, module in watched.items():
        handles.append(module.register_forward_hook(lambda *_, n=name: ran.append(n) if cancel.is_set() else None))
    return ran, handles


@pytest.mark.parametrize("where", ["unet", "vae"])
def test_a_cancel_inside_a_step_stops_at_the_next_block(sd15, where):
    pipe = sd15.pipe
    clean = hooks_left(pipe)
    fresh = Generator(sd15)(REQUEST).images
    cancel = threading.Event()
    if where == "unet":  # in the middle of the first step's UNet call: after its first down block
        trigger, watched = pipe.unet.down_blocks[0], {"mid": pipe.unet.mid_block, "up": pipe.unet.up_blocks[0]}
    else:  # after the last step, while the VAE decodes the two images
        trigger, watched = pipe.vae.decoder.mid_block, {"up": pipe.vae.decoder.up_blocks[0]}
    ran, handles = blocks_run_after(cancel, trigger, watched)
    try:
        with pytest.raises(Cancelled):
            Generator(sd15)(REQUEST, cancel=cancel)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [], f"blocks ran after the cancel: {ran}"
    assert hooks_left(pipe) == clean, "the cancel points were not removed"
    again = Generator(sd15)(REQUEST).images  # nothing of the stopped job is left behind
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fresh, again))


def test_a_compiled_unet_is_checked_only_before_each_call(sd15):
    """A hook inside a compiled graph would break it into pieces; the decoder is not compiled and keeps its checks."""
    pipe = sd15.pipe
    compiled = block_modules(pipe, compiled=True)
    assert pipe.unet in compiled and not any(m in compiled for m in pipe.unet.down_blocks)
    assert all(m in compiled for m in pipe.vae.decoder.up_blocks)
    assert len(block_modules(pipe, compiled=False)) > len(compiled)


def test_chunked_self_attention_gives_the_same_image_bit_for_bit(sd15, monkeypatch):
    """The tiny model's 64² image has 64 cells at its first self-attention: 16-row chunks split it in four."""
    plain = GenerateRequest("a photo of dog and cat", seed=3, steps=2, num_images=2)
    whole = Generator(sd15)(plain).images  # no cancel flag: diffusers' processors as they are
    monkeypatch.setattr("engines.cancel_points.CHUNK_ROWS", 16)
    calls = []
    real = ChunkedSelfAttention.__call__
    monkeypatch.setattr(ChunkedSelfAttention, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    chunked = Generator(sd15)(plain, cancel=threading.Event()).images
    assert calls, "the self-attention was not chunked"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole, chunked))


def test_a_cancel_inside_one_self_attention_call_stops_between_its_chunks(sd15, monkeypatch):
    monkeypatch.setattr("engines.cancel_points.CHUNK_ROWS", 16)
    cancel, chunks = threading.Event(), []
    attention = sd15.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    def count_chunk(_module, args):
        chunks.append(args[0].shape[1])
        if len(chunks) == 2:  # the second chunk of the first call is running: Stop
            cancel.set()

    handle = attention.to_q.register_forward_pre_hook(count_chunk)
    try:
        with pytest.raises(Cancelled):
            Generator(sd15)(GenerateRequest("a photo of dog", seed=3, steps=2), cancel=cancel)
    finally:
        handle.remove()
    assert chunks == [16, 16], f"chunks run: {chunks}"  # the third of four never started
    assert not any(isinstance(p, ChunkedSelfAttention) for p in sd15.pipe.unet.attn_processors.values())
