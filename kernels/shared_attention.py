"""Masked shared attention between views generated together (SynCD §3.2, Eq. 1), for making a dataset.

The V views of one object are one batch. In every self-attention (attn1) layer, view i's queries attend over its own
tokens and every other view's tokens (Eq. 1):

    softmax(Q_i [K_1 … K_V]ᵀ · s + B_i) [V_1; …; V_V]                 s = 1/√d

B_i is 0 on view i's own tokens and, for another view j, 0 on j's foreground tokens and a hard mask on its background,
so the views share the object's look and not their scenes. For the first denoising step no foreground is known yet
and B_i = 0 (SynCD Appendix C.1: "each image attends to everything in the other image at the first time step");
after it, the foreground is re-estimated every step from the class word's cross-attention (engines/foreground_masks.py),
which the cross-attention (attn2) recorders here accumulate. With classifier-free guidance the batch holds one group
of V rows per branch; views share only within their group, so the unconditional predictions of the views are as
coupled as the conditional ones and the guidance difference stays within one shared generation.

The bias is built per view over the key columns only, (V, 1, 1, V·N), and broadcast over the queries: nothing of
size (V·N)² is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.attention_record import split_heads
from kernels.maps import HARD_MASK


@dataclass
class SharedAttentionState:
    """What the shared-attention processors of one UNet share while one object's views are generated."""

    views: int
    latent_size: tuple[int, int]  # (h, w) of the latents: the resolution maps are accumulated at
    class_positions: tuple[int, ...]  # the class word's token positions in every view's prompt
    shared: bool = True  # False: every view is generated alone (to measure what sharing does)
    foreground: torch.Tensor | None = None  # (V, h, w) bool; None: the views see all of each other
    map_sum: torch.Tensor | None = None  # (V, h, w) float32: the class word's attention, summed over layers and calls
    map_count: int = 0
    column_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def set_foreground(self, foreground: torch.Tensor | None) -> None:
        self.foreground = foreground
        self.column_cache.clear()

    def mean_map(self) -> torch.Tensor:
        """(V, h, w): the class word's cross-attention averaged over every layer and step recorded so far."""
        if self.map_sum is None:
            return torch.zeros(self.views, *self.latent_size)  # nothing recorded: no foreground anywhere
        return self.map_sum / max(self.map_count, 1)

    def add_map(self, maps: torch.Tensor) -> None:
        """maps (V, n, m) at one attention resolution, brought to the latents' resolution before summing."""
        maps = F.interpolate(maps[:, None].float(), size=self.latent_size, mode="bilinear", align_corners=False)
        maps = maps[:, 0]  # (V, h, w)
        self.map_sum = maps if self.map_sum is None else self.map_sum + maps
        self.map_count += 1

    def grid(self, tokens: int) -> tuple[int, int]:
        """The (n, m) grid of an attention resolution with `tokens` cells, from the latents' aspect ratio."""
        height, width = self.latent_size
        factor = round((height * width / tokens) ** 0.5)
        return -(-height // factor), -(-width // factor)  # ceil: a stride-2 convolution rounds odd sizes up

    def bias(self, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(V, 1, 1, V·N) additive bias over the keys of all views for each query view, or None (all visible)."""
        if self.foreground is None:
            return None
        key = (tokens, str(device), dtype)
        if key not in self.column_cache:
            # a coarse cell is foreground when any latent cell inside it is: small objects survive the coarse layers
            pooled = F.adaptive_max_pool2d(self.foreground[:, None].float(), self.grid(tokens))  # (V, 1, n, m)
            visible = pooled.reshape(1, -1).bool().repeat(self.views, 1)  # (V, V·N) others' foreground
            for view in range(self.views):
                visible[view, view * tokens : (view + 1) * tokens] = True  # a view always sees all of itself
            bias = torch.where(visible, 0.0, HARD_MASK).to(device=device, dtype=dtype)  # (V, V·N)
            self.column_cache[key] = bias[:, None, None]  # (V, 1, 1, V·N)
        return self.column_cache[key]


class SharedSelfAttnProcessor:
    """Replaces one self-attention (attn1) processor while the views of one object are generated."""

    def __init__(self, state: SharedAttentionState, original) -> None:
        self.state = state
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        views = self.state.views
        if (
            not self.state.shared
            or views < 2
            or encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or hidden_states.shape[0] % views
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, tokens, _ = hidden_states.shape  # (B, N, C), B = groups · V
        groups = batch // views
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        key = split_heads(attn.to_k(hidden_states), attn.heads)  # (B, H, N, d)
        value = split_heads(attn.to_v(hidden_states), attn.heads)  # (B, H, N, d)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        keys, values = _all_views(key, groups, views), _all_views(value, groups, views)  # (B, H, V·N, d)
        bias = self.state.bias(tokens, query.device, query.dtype)  # (V, 1, 1, V·N) or None
        if bias is not None:
            bias = bias.repeat(groups, 1, 1, 1)  # (B, 1, 1, V·N)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)  # (B, H, N, d) — Eq. 1
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, H·d)
        out = attn.to_out[1](attn.to_out[0](out))  # (B, N, C)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _all_views(x: torch.Tensor, groups: int, views: int) -> torch.Tensor:
    """(G·V, H, N, d) → (G·V, H, V·N, d): every row gets the tokens of all the views of its group, view order."""
    _, heads, tokens, dim = x.shape
    joined = x.view(groups, views, heads, tokens, dim).transpose(1, 2).reshape(groups, heads, views * tokens, dim)
    return joined[:, None].expand(groups, views, heads, views * tokens, dim).reshape(-1, heads, views * tokens, dim)


class ClassAttentionRecorder:
    """Wraps one cross-attention (attn2) processor: the output is the wrapped processor's; on the side it adds the
    class word's attention map of the conditional rows (the last V) to the state."""

    def __init__(self, state: SharedAttentionState, original) -> None:
        self.state = state
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            self._record(attn, hidden_states, encoder_hidden_states)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    @torch.no_grad()
    def _record(self, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        views, tokens = self.state.views, hidden_states.shape[1]
        rows = slice(hidden_states.shape[0] - views, None)  # the conditional branch is the batch's second half
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = split_heads(attn.to_q(hidden_states[rows]), attn.heads)  # (V, H, N, d)
        key = split_heads(attn.to_k(context[rows]), attn.heads)  # (V, H, T, d)
        scores = query.float() @ key.float().transpose(-1, -2) * attn.scale  # (V, H, N, T)
        probabilities = scores.softmax(dim=-1).mean(dim=1)  # (V, N, T)
        span = probabilities[..., list(self.state.class_positions)].sum(dim=-1)  # (V, N): the whole class word
        self.state.add_map(span.reshape(views, *self.state.grid(tokens)))


def install_shared_attention(unet, state: SharedAttentionState) -> dict:
    """Put shared processors on every self-attention and recorders on every cross-attention; return the previous
    processors, which the caller must restore."""
    previous = dict(unet.attn_processors)
    replaced = {}
    for name, processor in previous.items():
        if name.endswith("attn1.processor"):
            replaced[name] = SharedSelfAttnProcessor(state, processor)
        elif name.endswith("attn2.processor"):
            replaced[name] = ClassAttentionRecorder(state, processor)
        else:
            replaced[name] = processor
    unet.set_attn_processor(replaced)
    return previous
