"""Grounding loss for the demo model: tie each object's words to its pixels in every cross-attention map.

Why: layout guidance (Cones 2 Eq. 7) steers *where an object's words are attended*. That steers where the object
is drawn only if the model draws objects from those words. Large Stable Diffusion models learn this from web data
(a noun's cross-attention map outlines its object); a tiny text encoder trained from scratch on a few thousand
captions does not: it spreads object identity over the later tokens and the EOS padding, and guidance then moves
nothing (docs/demo-model.md). So while training, the demo model gets the two grounding terms of TokenCompose (Wang
et al., CVPR 2024), on the visible mask of each object:

    L_token = mean_o (1 - sum_u A_o(u) m_o(u) / sum_u A_o(u))^2       (attention of o's words falls inside o)
    L_pixel = mean_o,u BCE(A_o(u), m_o(u))                            (o's pixels attend to o's words, others not)

where A_o(u) = sum over o's content words t of softmax_t(Q K^T / sqrt(d))[u, t] (heads averaged) and m_o is the
object's visible mask, area-averaged to the attention resolution; the maps come from kernels/attention_record.py,
which also holds L_token's (1 − inside)² term, shared with box fitting. Only training uses this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engines.prompts import positions_in_chars
from kernels.attention_record import inside_energy

from .scenes import Scene

MAX_OBJECTS = 4
MAX_WORDS = 6  # content words of one object phrase: "red ball with yellow stripes" has 4
FUNCTION_WORDS = frozenset({"a", "an", "with"})
MASK_SIDE = 16  # the UNet's largest attention resolution


@dataclass(frozen=True)
class GroundingTargets:
    """Per scene: token positions of each object's content words (-1 = none) and its visible mask."""

    positions: torch.Tensor  # [N, MAX_OBJECTS, MAX_WORDS] int64
    masks: torch.Tensor  # [N, MAX_OBJECTS, MASK_SIDE, MASK_SIDE] float16 in [0, 1]


def grounding_targets(scenes: Sequence[Scene], tokenizer) -> GroundingTargets:
    positions = torch.full((len(scenes), MAX_OBJECTS, MAX_WORDS), -1, dtype=torch.int64)
    masks = torch.zeros((len(scenes), MAX_OBJECTS, MASK_SIDE, MASK_SIDE), dtype=torch.float16)
    offsets = tokenizer([s.caption for s in scenes], return_offsets_mapping=True, truncation=True).offset_mapping
    for n, (scene, scene_offsets) in enumerate(zip(scenes, offsets)):
        for o, (obj, (start, end)) in enumerate(zip(scene.objects[:MAX_OBJECTS], scene.phrase_spans)):
            words = content_word_positions(scene.caption, start, end, scene_offsets)[:MAX_WORDS]
            positions[n, o, : len(words)] = torch.tensor(words, dtype=torch.int64)
            masks[n, o] = torch.from_numpy(_area_downsample(obj.mask, MASK_SIDE))
    return GroundingTargets(positions, masks)


def content_word_positions(caption: str, start: int, end: int, offsets) -> list[int]:
    """Token positions of the phrase caption[start:end], without its article and "with"."""
    found, cursor = [], start
    for word in caption[start:end].split(" "):
        if word not in FUNCTION_WORDS:
            found += positions_in_chars(offsets, cursor, cursor + len(word))
        cursor += len(word) + 1
    return found


def _area_downsample(mask: np.ndarray, side: int) -> np.ndarray:
    k = mask.shape[0] // side
    return mask.reshape(side, k, side, k).mean(axis=(1, 3)).astype(np.float16)


def grounding_loss(
    maps: Sequence[torch.Tensor], positions: torch.Tensor, masks: torch.Tensor, pixel_weight: float = 0.5
) -> torch.Tensor:
    """L_token + pixel_weight * L_pixel over every recorded cross-attention map (see the module docstring).

    maps: [B, HW, T] each; positions: [B, O, W] (-1 = none); masks: [B, O, 16, 16]. Objects with no words (empty
    captions) or no visible pixels are skipped."""
    batch, objects, _ = positions.shape
    tokens = maps[0].shape[-1]
    select = F.one_hot(positions.clamp(min=0), tokens).float() * (positions >= 0).unsqueeze(-1).float()
    select = select.sum(dim=2)  # [B, O, T]: 1 on each object's content words
    valid = (select.sum(-1) > 0) & (masks.flatten(2).sum(-1) > 0)  # [B, O]
    if not valid.any():
        return maps[0].sum() * 0.0
    losses = []
    for attention in maps:
        side = int(attention.shape[1] ** 0.5)
        m = F.adaptive_avg_pool2d(masks.float(), side).flatten(2)  # [B, O, HW]
        a = torch.einsum("but,bot->bou", attention, select)  # [B, O, HW]: attention on o's words
        token_term = inside_energy(a, m, eps=1e-6)  # [B, O]
        pixel_term = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), m, reduction="none").mean(-1)
        losses.append(((token_term + pixel_weight * pixel_term) * valid).sum() / valid.sum())
    return torch.stack(losses).mean()
