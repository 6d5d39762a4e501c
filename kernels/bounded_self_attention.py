"""Bounded Attention's self-attention bound in query chunks, for attention layers too large for an (N, N) bias.

The bound (Dahary et al., Bounded Attention; DESIGN.md "Layout guidance"): a cell of one region may not attend to a
cell of another region; background cells attend to and are attended by everything. With o the (N,) owner ids
(BACKGROUND = −1 for no region) and c_b = 1 on the conditional rows of the batch, 0 on the unconditional ones:

    blocked[q, k] = (o_q ≠ o_k) ∧ (o_q ≠ −1) ∧ (o_k ≠ −1)
    S_b[q, k]     = c_b · HARD_MASK · blocked[q, k]
    out_b         = softmax(Q_b K_bᵀ · s + S_b) V_b                    s = 1/√d

A softmax row depends only on its own query, so the rows can be computed in chunks of queries: the chunk's bias
(B, 1, chunk, N) is built from o on the fly, and nothing of size N×N is ever held. For N ≤ PRECOMPUTED_MAX_CELLS
(SD 1.5 at 512², SDXL at 1024²: N = 4096 at the finest layer) the whole (B, 1, N, N) bias is small (≤ 128 MB in
fp32 for B = 2) and kernels/region_attention.py precomputes it once per request, so a guided call adds no operator
(tests/kernels/test_region_attention_compile.py); above it — SD 1.5 at 1024², N = 16384, where that bias alone is
2 GB and a masked SDPA that falls back to the math kernel materialises (B, H, N, N) scores, 34 GB — this path runs.
Results equal the precomputed path's up to the summation order of the chunked kernels
(tests/kernels/test_bounded_self_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.maps import BACKGROUND, HARD_MASK

# Layers with at most this many cells keep the precomputed (B, 1, N, N) bias (the fast path, 0 extra operators per
# call); 4096 = 64², the finest attention layer of SD 1.5 at 512² and of SDXL at 1024². Read at call time, so a test
# can move it.
PRECOMPUTED_MAX_CELLS = 4096
# A chunk's scores (B·H·chunk·N in the attention's dtype) stay under this: the size a fused kernel's fallback may
# materialise per chunk. 256 MB keeps a chunk of SD 1.5 at 1024² (B = 2, H = 8, N = 16384, fp32: 1 MB a query row)
# at 256 queries — large enough that the per-chunk overhead is a few percent of the matmuls, small next to the
# UNet's own activations.
CHUNK_SCORE_BYTES = 256 * 2**20


def blocked_cells(query_owner: torch.Tensor, key_owner: torch.Tensor) -> torch.Tensor:
    """The bound between owner ids: (Q,) and (K,) long → (Q, K) bool, True where the query may not see the key."""
    different = query_owner[:, None] != key_owner[None, :]  # (Q, K)
    return different & (query_owner != BACKGROUND)[:, None] & (key_owner != BACKGROUND)[None, :]


def chunk_size(batch: int, heads: int, cells: int, dtype: torch.dtype) -> int:
    """Queries per chunk so that a chunk's B·H·chunk·N scores fit CHUNK_SCORE_BYTES (at least one query)."""
    per_query = batch * heads * cells * torch.empty((), dtype=dtype).element_size()
    return max(1, min(cells, CHUNK_SCORE_BYTES // per_query))


def bounded_self_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """softmax(QKᵀ·s + S)V with the bound S built per query chunk from the owner ids.
    query, key, value (B, H, N, d); owner (N,) long; rows (B,) 1 on the conditional rows → (B, H, N, d)."""
    batch, heads, cells, _ = query.shape
    step = chunk_size(batch, heads, cells, query.dtype)
    row_scale = rows.to(query.dtype)[:, None, None, None]  # (B, 1, 1, 1): the unconditional rows stay unbiased
    out = torch.empty_like(query)  # (B, H, N, d)
    for start in range(0, cells, step):
        stop = min(start + step, cells)
        blocked = blocked_cells(owner[start:stop], owner)  # (chunk, N)
        mask = torch.where(blocked, HARD_MASK, 0.0).to(query.dtype)  # (chunk, N)
        bias = row_scale * mask  # (B, 1, chunk, N)
        out[:, :, start:stop] = F.scaled_dot_product_attention(query[:, :, start:stop], key, value, attn_mask=bias)
    return out
