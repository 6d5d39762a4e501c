"""What the attention processors read about a layout at one attention resolution (built by engines/layout.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKGROUND = -1  # the owner of a cell no region owns
# Biases are clamped here after scaling by η(t): exp(-1e4) is 0 in every dtype, while the public code's -1e8 would
# overflow fp16 to -inf. Clamping after (not before) the scaling keeps -1e8 a hard mask even where η(t) is tiny.
HARD_MASK = -1e4


@dataclass(frozen=True)
class ResolutionMaps:
    """One attention resolution (height × width latent cells), as flat row-major tensors."""

    height: int
    width: int
    owner: torch.Tensor  # (HW,) long: index of the region owning each cell, or BACKGROUND
    fit_weights: torch.Tensor  # (R, HW) float: box fitting's w, each cell's visible area over the best cell's
    token_weights: torch.Tensor  # (HW, T) float: M of Cones 2 Eq. 7 for the region tokens, 0 for every other token
    # (HW, HW) bool: query cell may not attend to key cell (different regions); None when the bound is off, or when
    # HW > kernels.bounded_self_attention.PRECOMPUTED_MAX_CELLS (an (HW, HW) bool is 268 MB at 128²): then the
    # processors build it per query chunk from `owner`
    self_blocked: torch.Tensor | None
    bound_self: bool = False  # Bounded Attention's self bound is on (also where self_blocked is None for size)
