"""Region-guided attention processors for diffusers UNets (Cones 2 §3.3 Eq. 7; Bounded Attention's self bound).

Cross-attention: softmax((QKᵀ + η(t)·M)·s)V with s = 1/√d, η(t) = strength·log(1+σ_t²)·std(QKᵀ) and M the
per-cell, per-token weights of engines/layout.py — only on the rows of the conditional branch. The bias goes into
the fused SDPA kernel as its additive mask, so no attention map is materialised, and std(QKᵀ) comes from the
second moments of Q and K (exact, O(N·d²) instead of an N×T score matrix):
    mean(QKᵀ) = mean_h( q̄_h · k̄_h ),   mean((QKᵀ)²) = mean_h( ⟨QᵀQ/N, KᵀK/T⟩_F ).
Self-attention (optional): cells of different regions may not attend to each other (hard mask).
While an AttentionRecord captures (box fitting, engines/box_fitting.py), cross-attention also keeps its attention
probabilities *without* the bias, with their autograd graph: they say where the model is drawing each region's object.
Whenever there is nothing to add, the processor hands the call to the processor it replaced, so unguided steps
are bit-identical to plain diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.attention_record import AttentionRecord, attention_probabilities, split_heads
from kernels.maps import HARD_MASK, ResolutionMaps


@dataclass
class GuidanceState:
    """Per-request data every processor of one UNet reads; the generator updates `time_scale` before each call."""

    maps: dict[int, ResolutionMaps]  # keyed by the number of query tokens HW
    images: int  # conditional rows: the last `images` rows of a call (all of them when CFG is not batched in)
    time_scale: float = 0.0  # strength · log(1 + σ_t²) at the current timestep; 0 disables guidance
    suspended: bool = False  # True while the UNet runs for something else than the target (the reference pass)
    record: AttentionRecord = field(default_factory=AttentionRecord)
    device_maps: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def conditional_rows(self, batch: int) -> slice:
        """diffusers batches CFG as [unconditional..., conditional...]; a call with only `images` rows (box fitting,
        or CFG off) is all conditional."""
        return slice(max(batch - self.images, 0), batch)

    def cached(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Maps move to the device and dtype once per request, not once per step."""
        if key not in self.device_maps:
            self.device_maps[key] = make()
        return self.device_maps[key]


def score_std(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the raw scores QKᵀ over heads, queries and keys, per batch row, without forming them.
    query (B, H, N, d), key (B, H, T, d) → (B,)."""
    q, k = query.float(), key.float()
    mean = (q.mean(dim=2) * k.mean(dim=2)).sum(-1).mean(-1)  # (B,)
    q_moment = q.transpose(-1, -2) @ q / q.shape[2]  # (B, H, d, d)
    k_moment = k.transpose(-1, -2) @ k / k.shape[2]  # (B, H, d, d)
    square = (q_moment * k_moment).sum(dim=(-1, -2)).mean(-1)  # (B,)
    return (square - mean**2).clamp(min=0).sqrt()


class RegionAttnProcessor:
    """Replaces one attention processor of the UNet for the duration of a request."""

    def __init__(self, state: GuidanceState, original, is_cross: bool) -> None:
        self.state = state
        self.original = original
        self.is_cross = is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        maps = self._maps_for(attn, hidden_states, encoder_hidden_states, attention_mask)
        if maps is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._guided(attn, hidden_states, encoder_hidden_states, maps)

    def _maps_for(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> ResolutionMaps | None:
        recording = self.is_cross and self.state.record.capturing
        if (
            self.state.suspended
            or (self.state.time_scale == 0 and not recording)
            or attention_mask is not None
            or hidden_states.ndim != 3
        ):
            return None
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            return None  # not a transformer-block attention of SD's UNet
        if self.is_cross and (encoder_hidden_states is None or attn.norm_cross):
            return None
        maps = self.state.maps.get(hidden_states.shape[1])
        if maps is None or (not self.is_cross and maps.self_blocked is None):
            return None
        return maps

    def _guided(self, attn, hidden_states, encoder_hidden_states, maps: ResolutionMaps) -> torch.Tensor:
        batch, queries, _ = hidden_states.shape  # (B, N, C)
        context = encoder_hidden_states if self.is_cross else hidden_states
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        key = split_heads(attn.to_k(context), attn.heads)  # (B, H, T, d)
        value = split_heads(attn.to_v(context), attn.heads)  # (B, H, T, d)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if self.is_cross and self.state.record.capturing:  # only box fitting reads them (a matmul and a softmax)
            self.state.record.add(attention_probabilities(query, key), maps)
        bias = self._cross_bias(query, key, maps) if self.is_cross else self._self_bias(query, maps)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, queries, -1).to(query.dtype)  # (B, N, H·d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _cross_bias(self, query: torch.Tensor, key: torch.Tensor, maps: ResolutionMaps) -> torch.Tensor:
        """(QKᵀ + η·M)·s = QKᵀ·s + (η·s)·M: the Eq. 7 bias in SDPA's post-scale units. (B, 1, N, T)."""
        batch, tokens = query.shape[0], key.shape[2]
        weights = self.state.cached(
            ("cross", id(maps), str(query.device)), lambda: maps.token_weights.to(query.device)
        )[:, :tokens]  # (N, T)
        rows = self.state.conditional_rows(batch)
        scale = query.shape[-1] ** -0.5
        eta = torch.zeros(batch, device=query.device)
        eta[rows] = self.state.time_scale * score_std(query[rows], key[rows]) * scale  # (B,)
        bias = eta[:, None, None, None] * weights  # (B, 1, N, T)
        return bias.clamp(min=HARD_MASK).to(query.dtype)

    def _self_bias(self, query: torch.Tensor, maps: ResolutionMaps) -> torch.Tensor:
        batch = query.shape[0]
        blocked = self.state.cached(
            ("self", id(maps), str(query.device), query.dtype),
            lambda: torch.where(maps.self_blocked.to(query.device), HARD_MASK, 0.0).to(query.dtype),
        )  # (N, N)
        bias = torch.zeros((batch, 1) + blocked.shape, dtype=query.dtype, device=query.device)  # (B, 1, N, N)
        bias[self.state.conditional_rows(batch)] = blocked
        return bias


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
