"""Region-guided attention processors for diffusers UNets (Cones 2 §3.3 Eq. 7; Bounded Attention's self bound).

Cross-attention: softmax((QKᵀ + η(t)·M)·s)V with s = 1/√d, η(t) = strength·log(1+σ_t²)·std(QKᵀ) and M the
per-cell, per-token weights of engines/layout.py — only on the rows of the conditional branch. The bias goes into
the fused SDPA kernel as its additive mask, so no attention map is materialised, and std(QKᵀ) comes from two
contractions of Q and K (exact, O(T·d²) instead of an N×T score matrix), over the K = H·N·T scores of a row:
    Σ s = Σ_h (Σ_n q_n)·(Σ_t k_t),   Σ s² = Σ_h Σ_t k_tᵀ (QᵀQ) k_t,   K·var = Σ s² − (Σ s)²/K.
Self-attention (optional): cells of different regions may not attend to each other (hard mask); above
PRECOMPUTED_MAX_CELLS cells the bound is built per query chunk from the owner ids (kernels/bounded_self_attention.py).
While an AttentionRecord captures (box fitting, engines/box_fitting.py), cross-attention also keeps its attention
probabilities *without* the bias, with their autograd graph: they say where the model is drawing each region's object.
Whenever there is nothing to add, the processor hands the call to the processor it replaced, so unguided steps
are bit-identical to plain diffusers.

Why the per-call work is so small (issue 18: on a GPU, small kernels, not arithmetic, were guidance's cost): every
tensor that depends only on the request — M split into its soft part and its hard mask, the self-attention bound,
the conditional-row indicator — is made once per request by `prepare`, in the attention's dtype and on its device;
η(t)'s time factor is a tensor the UNet's pre-hook fills in place, so `torch.compile` sees no Python float change
between steps and the guided UNet compiles without graph breaks (tests/kernels/test_region_attention_compile.py).
A guided cross-attention call adds 7 aten operators over diffusers' own processor in fp32, 10 in fp16/bf16 (the
statistics are taken in fp32: Σ s² over a 64×64 layer overflows fp16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import bounded_self_attention as bounded
from kernels.attention_record import AttentionRecord, attention_probabilities, split_heads
from kernels.maps import HARD_MASK, ResolutionMaps


@dataclass(frozen=True)
class RequestTensors:
    """What one resolution's processors read, made once per request (shapes for B batch rows, N cells, T tokens)."""

    soft: torch.Tensor  # (1, N, T) fp32: M where it is not a hard mask, 0 elsewhere
    hard: dict[int, torch.Tensor]  # B → (B, 1, N, T) fp32: HARD_MASK where M is one, on the conditional rows only
    self_bias: dict[int, torch.Tensor]  # B → (B, 1, N, N) in the attention dtype: the self bound, conditional rows
    self_owner: torch.Tensor | None = None  # (N,) long: the bound's owner ids, where N is too large for self_bias


@dataclass
class GuidanceState:
    """Per-request data every processor of one UNet reads; the generator sets η(t) before each UNet call."""

    maps: dict[int, ResolutionMaps]  # keyed by the number of query tokens HW
    images: int  # conditional rows: the last `images` rows of a call (all of them when CFG is not batched in)
    suspended: bool = False  # True while the UNet runs for something else than the target (the reference pass)
    record: AttentionRecord = field(default_factory=AttentionRecord)
    guiding: bool = False  # η(t) ≠ 0 at the current call
    tensors: dict[int, RequestTensors] = field(default_factory=dict)  # keyed like `maps`; filled by `prepare`
    time_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # B → (B,) fp32: η's time factor per row
    row_indicators: dict[int, torch.Tensor] = field(default_factory=dict)  # B → (B,): 1 on the conditional rows

    def conditional_rows(self, batch: int) -> slice:
        """diffusers batches CFG as [unconditional..., conditional...]; a call with only `images` rows (box fitting,
        or CFG off) is all conditional."""
        return slice(max(batch - self.images, 0), batch)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the maps to where the attention runs, for a call with CFG (2·images rows) or without (images)."""
        self.row_indicators = {b: self._row_indicator(b, device) for b in (self.images, 2 * self.images)}
        self.time_rows = {b: torch.zeros(b, device=device) for b in self.row_indicators}
        self.tensors = {cells: self._request_tensors(maps, device, dtype) for cells, maps in self.maps.items()}

    def set_time_scale(self, value: float) -> None:
        """η's time factor strength·log(1 + σ_t²) for the next UNet call: written into the same tensors in place."""
        self.guiding = value != 0
        for batch, rows in self.time_rows.items():
            torch.mul(self.row_indicators[batch], value, out=rows)

    def _row_indicator(self, batch: int, device: torch.device) -> torch.Tensor:
        indicator = torch.zeros(batch, device=device)
        indicator[self.conditional_rows(batch)] = 1.0
        return indicator  # (B,)

    def _request_tensors(self, maps: ResolutionMaps, device: torch.device, dtype: torch.dtype) -> RequestTensors:
        weights = maps.token_weights.to(device)  # (N, T)
        is_hard = weights <= HARD_MASK  # a weight this negative masks at any η the schedule gives
        hard = torch.where(is_hard, HARD_MASK, 0.0)  # (N, T)
        rows = {b: indicator[:, None, None, None] for b, indicator in self.row_indicators.items()}  # (B, 1, 1, 1)
        bounding = maps.bound_self or maps.self_blocked is not None
        large = maps.owner.numel() > bounded.PRECOMPUTED_MAX_CELLS  # no (N, N) tensor: chunks at call time
        blocked = None
        if bounding and not large:
            cells = maps.self_blocked
            cells = bounded.blocked_cells(maps.owner, maps.owner) if cells is None else cells  # (N, N) bool
            blocked = torch.where(cells.to(device), HARD_MASK, 0.0)  # (N, N)
        return RequestTensors(
            soft=torch.where(is_hard, 0.0, weights)[None],
            hard={b: (row * hard).contiguous() for b, row in rows.items()},
            self_bias={} if blocked is None else {b: (row * blocked).to(dtype) for b, row in rows.items()},
            self_owner=maps.owner.to(device) if bounding and large else None,
        )


def score_spread(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """√K · std of the raw scores QKᵀ over heads, queries and keys (K = H·N·T of them), per batch row, without
    forming them. query (B, H, N, d), key (B, H, T, d) → (B,) fp32."""
    if query.dtype != torch.float32:
        query, key = query.float(), key.float()
    squares = torch.einsum("bhnd,bhne,bhtd,bhte->b", query, query, key, key)  # (B,) Σ s²: QᵀQ first, (B, H, d, d)
    sums = torch.einsum("bhnd,bhtd->b", query, key)  # (B,) Σ s: n and t are summed out before the product
    count = query.shape[1] * query.shape[2] * key.shape[2]
    return torch.addcmul(squares, sums, sums, value=-1.0 / count).clamp(min=0).sqrt()


class RegionAttnProcessor:
    """Replaces one attention processor of the UNet for the duration of a request."""

    def __init__(self, state: GuidanceState, original, is_cross: bool) -> None:
        self.state = state
        self.original = original
        self.is_cross = is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self._applies(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._guided(attn, hidden_states, encoder_hidden_states, self.state.tensors[hidden_states.shape[1]])

    def _applies(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        state = self.state
        recording = self.is_cross and state.record.capturing
        if state.suspended or not (state.guiding or recording) or attention_mask is not None:
            return False
        if hidden_states.ndim != 3 or hidden_states.shape[0] not in state.time_rows:
            return False
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            return False  # not a transformer-block attention of SD's UNet
        if self.is_cross and (encoder_hidden_states is None or attn.norm_cross):
            return False
        tensors = state.tensors.get(hidden_states.shape[1])
        return tensors is not None and (self.is_cross or bool(tensors.self_bias) or tensors.self_owner is not None)

    def _guided(self, attn, hidden_states, encoder_hidden_states, tensors: RequestTensors) -> torch.Tensor:
        batch, queries, _ = hidden_states.shape  # (B, N, C)
        context = encoder_hidden_states if self.is_cross else hidden_states
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        key = split_heads(attn.to_k(context), attn.heads)  # (B, H, T, d)
        value = split_heads(attn.to_v(context), attn.heads)  # (B, H, T, d)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if self.is_cross and self.state.record.capturing:  # only box fitting reads them (a matmul and a softmax)
            self.state.record.add(attention_probabilities(query, key), self.state.maps[queries])
        out = self._attend(query, key, value, tensors)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, queries, -1).to(query.dtype)  # (B, N, H·d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _attend(self, query, key, value, tensors: RequestTensors) -> torch.Tensor:
        """SDPA with this layer's bias: none while not guiding, Eq. 7 for cross-attention, the self bound
        precomputed — or, for a layer too large for an (N, N) bias, built per query chunk. (B, H, N, d)."""
        batch = query.shape[0]
        if not self.state.guiding:
            bias = None
        elif self.is_cross:
            bias = self._cross_bias(query, key, tensors)
        elif tensors.self_owner is not None:
            rows = self.state.row_indicators[batch]  # (B,): the bound applies to the conditional rows only
            return bounded.bounded_self_attention(query, key, value, tensors.self_owner, rows)
        else:
            bias = tensors.self_bias[batch]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

    def _cross_bias(self, query: torch.Tensor, key: torch.Tensor, tensors: RequestTensors) -> torch.Tensor:
        """(QKᵀ + η·M)·s = QKᵀ·s + (η·s)·M: the Eq. 7 bias in SDPA's post-scale units, η = time factor · std(QKᵀ).
        (B, 1, N, T)."""
        batch, heads, queries, width = query.shape
        tokens = key.shape[2]
        soft, hard = tensors.soft, tensors.hard[batch]
        if soft.shape[-1] != tokens:  # a prompt encoded shorter than the maps' token window
            soft, hard = soft[..., :tokens], hard[..., :tokens]
        spread = score_spread(query, key)  # (B,) √K·std(QKᵀ)
        eta = torch.einsum("b,b,hnt->bhnt", spread, self.state.time_rows[batch], soft)  # (B, 1, N, T) √K·η·M
        bias = torch.add(hard, eta, alpha=(heads * queries * tokens) ** -0.5 * width**-0.5)  # ÷√K, × s
        return bias if bias.dtype == query.dtype else bias.to(query.dtype)


def install(unet, state: GuidanceState, bound_self_attention: bool) -> dict:
    """Put region processors on every cross-attention (attn2) — and self-attention (attn1) when bounding — and
    return the previous processors, which the caller must restore (`unet.set_attn_processor(previous)`)."""
    previous = dict(unet.attn_processors)
    replaced = {}
    for name, processor in previous.items():
        is_cross = name.endswith("attn2.processor")
        wanted = is_cross or (bound_self_attention and name.endswith("attn1.processor"))
        replaced[name] = RegionAttnProcessor(state, processor, is_cross) if wanted else processor
    unet.set_attn_processor(replaced)
    return previous
