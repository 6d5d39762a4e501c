"""Cross-attention probabilities, recorded while a UNet runs, and the energy that asks them to stay inside a mask.

Two users: box fitting (engines/box_fitting.py) moves the latent down the gradient of the energy at generation, and
the demo model's grounding loss (demo_world/grounding.py) trains the model with the same term. Both read
A = softmax(QKᵀ/√d) averaged over heads, with its autograd graph, and

    E = (1 − Σ_u w_u A_u / Σ_u A_u)²          (Chen et al.'s layout-guidance loss; TokenCompose's L_token)

for an object's attention A over the cells u and the object's weights w_u in [0, 1] (its mask or box area).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def attention_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) averaged over heads, in fp32: query (B, H, N, d), key (B, H, T, d) → (B, N, T)."""
    scores = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5  # (B, H, N, T)
    return scores.softmax(dim=-1).mean(dim=1)


def inside_energy(attention: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(1 − share of the attention on the weighted cells)²: attention (..., N) ≥ 0, weights (..., N) → (...)."""
    inside = (attention * weights).sum(-1) / attention.sum(-1).clamp(min=eps)
    return (1 - inside) ** 2


class AttentionRecord:
    """Where processors put cross-attention probabilities while `capture()` is open: (probabilities (B, N, T), tag)
    per layer, in call order. The tag is whatever the processor knows the layer by (its resolution's maps)."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, Hashable]] | None = None

    @property
    def capturing(self) -> bool:
        return self.entries is not None

    @contextmanager
    def capture(self) -> Iterator[list[tuple[torch.Tensor, Hashable]]]:
        self.entries = []
        try:
            yield self.entries
        finally:
            self.entries = None

    def add(self, probabilities: torch.Tensor, tag: Hashable = None) -> None:
        if self.entries is not None:
            self.entries.append((probabilities, tag))


class RecordingAttnProcessor:
    """A diffusers attention processor that computes cross-attention explicitly and records its probabilities;
    self-attention goes through SDPA unchanged. For training (the demo model's grounding loss)."""

    def __init__(self, record: AttentionRecord) -> None:
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        key = split_heads(attn.to_k(context), attn.heads)  # (B, H, T, d)
        value = split_heads(attn.to_v(context), attn.heads)  # (B, H, T, d)
        if encoder_hidden_states is not None:
            probabilities = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # (B, H, N, T)
            self.record.add(probabilities.mean(dim=1))
            out = probabilities @ value  # (B, H, N, d)
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.inner_dim)  # (B, N, H·d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·d) → (B, H, L, d)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)
