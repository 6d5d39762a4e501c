"""kernels/bounded_self_attention.py (issue 20): above PRECOMPUTED_MAX_CELLS the self bound is built per query chunk
from the owner ids — the same attention as the precomputed (B, 1, N, N) bias, and no (N, N) tensor anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from engines.layout import build_maps
from engines.types import GuidanceConfig, Layout, Region
from kernels import bounded_self_attention as bounded
from kernels.region_attention import GuidanceState, RegionAttnProcessor

ROOT = Path(__file__).resolve().parents[2]
# three regions — the dog in front of the cat where they overlap, the ball inside the cat — and background around
LAYOUT = Layout(
    (
        Region("cat", (0.0, 0.1, 0.6, 0.9)),
        Region("dog", (0.4, 0.2, 1.0, 1.0), layer=1),
        Region("ball", (0.1, 0.5, 0.3, 0.7), layer=2),
    )
)


def _refuse(*args, **kwargs):
    raise AssertionError("the guided path handed the call back to the original processor")


def bounded_call(side: int, hidden: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, GuidanceState]:
    """One guided self-attention call at side² cells with the bound on, CFG rows (the last one conditional)."""
    config = GuidanceConfig(bound_self_attention=True)
    maps = build_maps(LAYOUT, [[2], [5], [7]], 77, (side, side), 1, config)
    state = GuidanceState(maps, images=1)
    state.prepare(torch.device("cpu"), hidden.dtype)
    state.set_time_scale(0.3)
    attn.set_processor(RegionAttnProcessor(state, _refuse, is_cross=False))
    with torch.no_grad():
        return attn(hidden), state


@pytest.mark.parametrize("step_bytes", [bounded.CHUNK_SCORE_BYTES, 24 * 2 * 4 * 256 * 4], ids=["one", "uneven"])
def test_chunked_bound_equals_the_precomputed_bias(monkeypatch, step_bytes):
    side, width, heads = 16, 32, 4
    torch.manual_seed(0)
    attn = Attention(width, heads=heads, dim_head=width // heads, processor=AttnProcessor2_0()).eval()
    hidden = torch.randn(2, side * side, width)  # (B, N, C): unconditional row, conditional row
    with torch.no_grad():
        plain = attn(hidden)
    precomputed, state = bounded_call(side, hidden, attn)
    assert state.maps[side * side].self_blocked is not None and state.tensors[side * side].self_owner is None
    monkeypatch.setattr(bounded, "PRECOMPUTED_MAX_CELLS", 16)  # every layer above it: the chunked path
    monkeypatch.setattr(bounded, "CHUNK_SCORE_BYTES", step_bytes)  # uneven: 24 queries a chunk, the last has 16
    chunked, state = bounded_call(side, hidden, attn)
    assert state.maps[side * side].self_blocked is None and not state.tensors[side * side].self_bias
    assert state.maps[side * side].bound_self and state.tensors[side * side].self_owner is not None
    torch.testing.assert_close(chunked, precomputed, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[0], plain[0], atol=2e-5, rtol=1e-4)  # the unconditional row: unbiased
    assert not torch.allclose(chunked[1], plain[1], atol=1e-3)  # the bound changes the conditional row


def test_the_chunked_bound_is_the_bound():
    """Against the definition: softmax over the keys a query may see, with the owner ids of the layout."""
    owner = torch.tensor([-1, 0, 0, 1, 1, 2, -1, 1, 0, 2])  # (N,): background, three regions
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 2, 2, 10, 4).unbind(0)  # (B, H, N, d) each
    rows = torch.tensor([0.0, 1.0])  # (B,): the second row conditional
    out = bounded.bounded_self_attention(query, key, value, owner, rows)
    allowed = (owner[:, None] == owner[None, :]) | (owner[:, None] < 0) | (owner[None, :] < 0)  # (N, N)
    scores = query @ key.transpose(-1, -2) / 2  # (B, H, N, N), s = 1/√4
    expected_cond = scores[1].masked_fill(~allowed, float("-inf")).softmax(-1) @ value[1]  # (H, N, d)
    torch.testing.assert_close(out[1], expected_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], scores[0].softmax(-1) @ value[0], atol=1e-5, rtol=1e-5)


def test_chunk_size_follows_the_memory_budget():
    # SD 1.5 at 1024², CFG, fp32: 2·8·16384·4 bytes = 1 MB a query row → 256 rows in 256 MB; fp16 twice as many
    assert bounded.chunk_size(2, 8, 16384, torch.float32) == 256
    assert bounded.chunk_size(2, 8, 16384, torch.float16) == 512
    assert bounded.chunk_size(1, 1, 64, torch.float32) == 64  # never more than N
    assert bounded.chunk_size(64, 64, 2**20, torch.float32) == 1  # never less than one query


MEMORY_SCRIPT = """
import resource, sys, torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from kernels import bounded_self_attention as bounded
from tests.kernels.test_bounded_self_attention import bounded_call
bounded.PRECOMPUTED_MAX_CELLS = int(sys.argv[1])
torch.manual_seed(0)
attn = Attention(8, heads=1, dim_head=8, processor=AttnProcessor2_0()).eval()
hidden = torch.randn(2, 128 * 128, 8)  # (B, N, C): SD 1.5's finest layer at 1024², N = 16384, tiny H and d
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = bounded_call(128, hidden, attn)  # build_maps, prepare, one guided call
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, bool(torch.isfinite(out).all()))
"""
PEAK_MB = 1200  # the chunked call: a 256 MB chunk of scores, its bias and softmax; the old path needs > 4 GB


def peak_growth_mb(max_cells: int) -> tuple[int, str]:
    """Growth of the peak RSS (MB) over build_maps + prepare + one bounded call at N = 16384, in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(max_cells)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown, finite = done.stdout.split()
    return int(grown), finite


def test_peak_memory_of_a_large_bounded_layer_is_bounded():
    grown, finite = peak_growth_mb(bounded.PRECOMPUTED_MAX_CELLS)
    assert finite == "True"
    assert grown < PEAK_MB, f"the bounded self-attention call grew the peak RSS by {grown} MB"
