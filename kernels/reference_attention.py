"""Masked shared attention over reference images (SynCD §4.2 and §4.3, Eq. 1), routed by region.

Each denoising step, the subjects' reference latents, re-noised to the step's t, go through the UNet once with these
processors in "write" mode: every self-attention layer keeps the keys and values of its input. In the target's pass
("read"), self-attention attends over its own tokens and the stored reference tokens (Eq. 1):

    softmax([Q K_selfᵀ · s + S,  Q K_refᵀ · s + B]) [V_self; V_ref]           s = 1/√d

B is log(strength) where target cell n may see reference token m — m lies in the (dilated) foreground of a reference
photo of the subject whose region owns n — and a hard mask elsewhere; S is 0, or the Bounded Attention bound between
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

    masks: dict[int, torch.Tensor]  # by target tokens N: (N, M) bool, may target cell n attend reference token m
    strength: float = 1.0  # multiplies the attention on allowed reference tokens (a logit bias of log(strength))
    rows: int = 0  # the last `rows` rows of a call see references (fewer rows in a call: all of them)
    mode: str = "off"  # "write": the reference pass stores keys and values; "read": the target pass uses them
    self_blocked: dict[int, torch.Tensor] = field(default_factory=dict)  # by N: (N, N) bool, Bounded Attention
    device_bias: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def reference_rows(self, batch: int) -> slice:
        return slice(max(batch - self.rows, 0), batch)

    def bias(self, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(N, N + M) additive bias for the rows that see references, cached per device and dtype."""
        key = (tokens, str(device), dtype)
        if key not in self.device_bias:
            allowed = self.masks[tokens].to(device)  # (N, M)
            weight = math.log(self.strength) if self.strength > 0 else HARD_MASK
            to_refs = torch.where(allowed, weight, HARD_MASK)  # (N, M)
            to_self = torch.zeros(tokens, tokens, device=device)  # (N, N)
            if tokens in self.self_blocked:
                to_self = to_self.masked_fill(self.self_blocked[tokens].to(device), HARD_MASK)
            self.device_bias[key] = torch.cat([to_self, to_refs], dim=1).to(dtype)  # (N, N + M)
        return self.device_bias[key]


class ReferenceAttnProcessor:
    """Replaces one self-attention (attn1) processor for the duration of a request."""

    def __init__(self, state: ReferenceState, original) -> None:
        self.state = state
        self.original = original
        self.keys: torch.Tensor | None = None  # (1, H, M, d): every reference's tokens, in the masks' column order
        self.values: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.state.mode == "write" and hidden_states.ndim == 3:
            self._store(attn, hidden_states)
        elif self._reads(hidden_states, encoder_hidden_states, attention_mask):
            return self._read(attn, hidden_states)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _store(self, attn, hidden_states: torch.Tensor) -> None:
        """The reference pass: keys and values of every reference's tokens, side by side. (R, m, C) → (1, H, R·m, d)."""
        refs, tokens, channels = hidden_states.shape
        flat = hidden_states.reshape(1, refs * tokens, channels)  # (1, R·m, C)
        self.keys = split_heads(attn.to_k(flat), attn.heads)
        self.values = split_heads(attn.to_v(flat), attn.heads)

    def _reads(self, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        state = self.state
        return (
            state.mode == "read"
            and self.keys is not None
            and encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and state.rows > 0
            and state.strength > 0
            and hidden_states.shape[1] in state.masks
            and state.masks[hidden_states.shape[1]].shape[1] == self.keys.shape[2]
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
        keys = torch.cat([key[rows], self.keys.to(key.dtype).expand(seeing, -1, -1, -1)], dim=2)  # (b, H, N + M, d)
        values = torch.cat([value[rows], self.values.to(value.dtype).expand(seeing, -1, -1, -1)], dim=2)
        bias = self.state.bias(tokens, query.device, query.dtype)  # (N, N + M)
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
