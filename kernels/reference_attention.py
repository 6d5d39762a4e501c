"""Masked shared attention over reference images (SynCD §4.2 and §4.3, Eq. 1), routed by region.

Each denoising step, the subjects' reference latents, re-noised to the step's t, go through the UNet once with these
processors in "write" mode: every self-attention layer keeps the keys and values of its input. In the target's pass
("read"), self-attention attends over its own tokens and the stored reference tokens (Eq. 1):

    softmax([Q K_selfᵀ · s + S,  Q K_refᵀ · s + B]) [V_self; V_ref]           s = 1/√d

B is log(strength) where target cell n may see reference token m — m lies in the (dilated) foreground of a reference
photo of the subject whose region owns n — and a hard mask elsewhere. As in SynCD, the reference pass stores each
layer's *input*; the keys and values come from the target pass's own projections, so a reference adapter (a LoRA on
these projections, engines/reference_adapter.py) shapes what is read as well as how it is read; S is 0, or the Bounded Attention bound between
regions when that is on. Only the rows that see references get B (the conditional branch; with image guidance also
the image-only branch); the other rows attend to their own tokens alone. The masks are built once per request
(engines/references.py); nothing here materialises more than the bias SDPA takes. With nothing to read, the call
goes to the processor this one replaced, so the image is bit-identical to running without references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.attention_record import split_heads
from kernels.maps import HARD_MASK


@dataclass
class ReferenceState:
    """What the reference processors of one UNet share during a request."""

    # by target tokens N: (N, M) bool, may target cell n attend reference token m; or (B, N, M) when every row of
    # the batch has references of its own (training: `grouped`)
    masks: dict[int, torch.Tensor]
    strength: float = 1.0  # multiplies the attention on allowed reference tokens (a logit bias of log(strength))
    rows: int = 0  # the last `rows` rows of a call see references (fewer rows in a call: all of them)
    mode: str = "off"  # "write": the reference pass stores keys and values; "read": the target pass uses them
    self_blocked: dict[int, torch.Tensor] = field(default_factory=dict)  # by N: (N, N) bool, Bounded Attention
    grouped: int = 0  # > 0: the reference pass holds this many references per target row, in row order
    device_bias: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def reference_rows(self, batch: int) -> slice:
        return slice(max(batch - self.rows, 0), batch)

    def bias(self, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(N, N + M) — or (B, 1, N, N + M) when grouped — additive bias for the rows that see references, cached
        per device and dtype."""
        key = (tokens, str(device), dtype)
        if key not in self.device_bias:
            allowed = self.masks[tokens].to(device)  # (N, M) or (B, N, M)
            weight = math.log(self.strength) if self.strength > 0 else HARD_MASK
            to_refs = torch.where(allowed, weight, HARD_MASK)  # (..., N, M)
            to_self = torch.zeros(tokens, tokens, device=device)  # (N, N)
            if tokens in self.self_blocked:
                to_self = to_self.masked_fill(self.self_blocked[tokens].to(device), HARD_MASK)
            bias = torch.cat([to_self.expand(*to_refs.shape[:-1], tokens), to_refs], dim=-1)  # (..., N, N + M)
            self.device_bias[key] = (bias[:, None] if bias.ndim == 3 else bias).to(dtype)
        return self.device_bias[key]


class ReferenceAttnProcessor:
    """Replaces one self-attention (attn1) processor for the duration of a request."""

    def __init__(self, state: ReferenceState, original) -> None:
        self.state = state
        self.original = original
        self.stored: torch.Tensor | None = None  # (1 or B, M, C): the references' tokens, in the masks' column order

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.state.mode == "write" and hidden_states.ndim == 3:
            self._store(attn, hidden_states)
        elif self._reads(hidden_states, encoder_hidden_states, attention_mask):
            return self._read(attn, hidden_states)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _store(self, attn, hidden_states: torch.Tensor) -> None:
        """The reference pass: every reference's input tokens side by side, (R, m, C) → (1, R·m, C); grouped, each
        target row's own references, (B·k, m, C) → (B, k·m, C)."""
        refs, tokens, channels = hidden_states.shape
        groups = refs // self.state.grouped if self.state.grouped else 1
        self.stored = hidden_states.detach().reshape(groups, refs // groups * tokens, channels)

    def _reads(self, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        state = self.state
        return (
            state.mode == "read"
            and self.stored is not None
            and encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and state.rows > 0
            and state.strength > 0
            and hidden_states.shape[1] in state.masks
            and state.masks[hidden_states.shape[1]].shape[-1] == self.stored.shape[1]
        )

    def _read(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape  # (B, N, C)
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        key = split_heads(attn.to_k(hidden_states), attn.heads)  # (B, H, N, d)
        value = split_heads(attn.to_v(hidden_states), attn.heads)  # (B, H, N, d)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        rows = self.state.reference_rows(batch)
        out = torch.empty_like(query)  # (B, H, N, d)
        plain = slice(0, rows.start)
        if rows.start > 0:
            out[plain] = F.scaled_dot_product_attention(query[plain], key[plain], value[plain])
        seeing = rows.stop - rows.start
        stored = self.stored.to(hidden_states.dtype)  # (1 or b, M, C)
        ref_key, ref_value = split_heads(attn.to_k(stored), attn.heads), split_heads(attn.to_v(stored), attn.heads)
        if attn.norm_k is not None:
            ref_key = attn.norm_k(ref_key)
        keys = torch.cat([key[rows], ref_key.expand(seeing, -1, -1, -1)], dim=2)  # (b, H, N + M, d)
        values = torch.cat([value[rows], ref_value.expand(seeing, -1, -1, -1)], dim=2)
        bias = self.state.bias(tokens, query.device, query.dtype)  # (N, N + M) or (b, 1, N, N + M)
        out[rows] = F.scaled_dot_product_attention(query[rows], keys, values, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, H·d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def install_references(unet, state: ReferenceState) -> dict:
    """Put reference processors on every self-attention (attn1) — wrapping whatever is there, layout guidance's
    bound included — and return the previous processors, which the caller must restore."""
    previous = dict(unet.attn_processors)
    replaced = {
        name: ReferenceAttnProcessor(state, processor) if name.endswith("attn1.processor") else processor
        for name, processor in previous.items()
    }
    unet.set_attn_processor(replaced)
    return previous
