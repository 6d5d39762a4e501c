"""An object's foreground from its class word's cross-attention (SynCD §3.2 and Appendix C.1, after Prompt-to-Prompt).

The map A (the class word's attention, averaged over layers and steps) is brought to the wanted resolution, split by
Otsu's threshold — the one that maximises the between-class variance of the two halves of A's histogram,

    k* = argmax_k (μ_T·ω(k) − μ(k))² / (ω(k)·(1 − ω(k)))      ω(k) = Σ_{i≤k} p_i,  μ(k) = Σ_{i≤k} p_i·c_i

— and grown by a 3×3 dilation, as SynCD's dataset script does, so the mask holds the object's edge too. No learned
segmenter: the mask needs nothing the diffusion model does not already compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BINS = 256
DILATION = 3  # the dilation's square kernel, in pixels of the output


def otsu_threshold(values: torch.Tensor) -> float:
    """The value above which `values` (any shape) is foreground; the maximum when they are all equal."""
    values = values.flatten().float()
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return high  # nothing to split: no foreground
    histogram = torch.histc(values, bins=BINS, min=low, max=high)  # (BINS,)
    p = histogram / histogram.sum()  # (BINS,)
    width = (high - low) / BINS
    centres = low + (torch.arange(BINS, dtype=torch.float64, device=values.device) + 0.5) * width  # (BINS,)
    omega = p.double().cumsum(0)  # (BINS,) ω(k)
    mu = (p.double() * centres).cumsum(0)  # (BINS,) μ(k)
    between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega)).clamp(min=1e-12)  # (BINS,)
    between[(omega <= 0) | (omega >= 1)] = -1.0  # one class empty: not a split
    return low + (int(between.argmax()) + 1) * width  # the upper edge of the last background bin


def foreground_masks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """maps (V, h, w) → (V, H, W) bool at `size` = (H, W): upsampled, Otsu-thresholded per view, dilated 3×3."""
    maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # (V, H, W)
    masks = torch.stack([view > otsu_threshold(view) for view in maps])  # (V, H, W)
    grown = F.max_pool2d(masks[:, None].float(), DILATION, stride=1, padding=DILATION // 2)  # (V, 1, H, W)
    return grown[:, 0] > 0


def mask_problem(masks: torch.Tensor, max_coverage: float) -> str | None:
    """Why these masks (V, H, W) bool make a bad dataset object, or None: a view where the class word found nothing,
    or where it spread over (almost) the whole picture — the object was not separated from its scene."""
    for view, mask in enumerate(masks):
        share = float(mask.float().mean())
        if share == 0:
            return f"view {view}'s mask is empty"
        if share > max_coverage:
            return f"view {view}'s mask covers {share:.0%} of the image (more than {max_coverage:.0%})"
    return None
