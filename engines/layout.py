"""Regions → per-attention-resolution ownership maps with z-order, token weight matrices, and the η(t) schedule.

Everything here is computed once per request (not per step): for each resolution the UNet attends at, which
region owns each latent cell, how much of each cell each region's box shows (for box fitting), the cross-attention
weight matrix M of Cones 2 Eq. 7, and (optionally) the self-attention bound of Bounded Attention. The attention
processors in kernels/ only scale and add them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engines.types import GuidanceConfig, Layout
from kernels import bounded_self_attention
from kernels.maps import BACKGROUND, ResolutionMaps


def attention_resolutions(latent_height: int, latent_width: int, levels: int) -> list[tuple[int, int]]:
    """Sizes the UNet attends at: each downsampling (stride-2 conv, padding 1) maps n to ceil(n / 2)."""
    sizes, h, w = [], latent_height, latent_width
    for _ in range(levels):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


def box_coverage(boxes: Sequence[tuple[float, float, float, float]], height: int, width: int) -> torch.Tensor:
    """Fraction of each cell's area inside each box, by exact area (not a bilinear footprint): (R, H, W)."""
    box = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)  # (R, 4)
    xs = torch.arange(width + 1, dtype=torch.float64) / width  # cell edges, (W + 1,)
    ys = torch.arange(height + 1, dtype=torch.float64) / height
    cover_x = (torch.minimum(xs[1:], box[:, 2:3]) - torch.maximum(xs[:-1], box[:, 0:1])).clamp(min=0) * width  # (R, W)
    cover_y = (torch.minimum(ys[1:], box[:, 3:4]) - torch.maximum(ys[:-1], box[:, 1:2])).clamp(min=0) * height  # (R, H)
    return cover_y[:, :, None] * cover_x[:, None, :]  # (R, H, W)


def region_owners(layout: Layout, height: int, width: int) -> torch.Tensor:
    """Which region owns each cell: the front-most region covering at least half of it (MS-CustomNet's
    back-to-front order). A region too small to cover half a cell still owns its best-covered cell unless a region
    in front already owns it, so small objects do not vanish at coarse resolutions. Returns (H, W) long."""
    owner = torch.full((height, width), BACKGROUND, dtype=torch.long)
    if not layout.regions:
        return owner
    coverage = box_coverage([r.box for r in layout.regions], height, width)  # (R, H, W)
    order = sorted(range(len(layout.regions)), key=lambda i: layout.regions[i].layer)  # back to front, stable
    for index in order:  # later (front) regions overwrite earlier (back) ones
        owner[coverage[index] >= 0.5] = index
    for rank, index in enumerate(order):
        if (owner == index).any():
            continue
        best = int(coverage[index].argmax())
        in_front = set(order[rank + 1 :])
        if int(owner.view(-1)[best]) not in in_front:
            owner.view(-1)[best] = index
    return owner


def visible_coverage(layout: Layout, height: int, width: int) -> torch.Tensor:
    """Exact fraction of each cell's area in which each region is the front-most box (its visible part): (R, H, W).
    The box edges and the cell edges cut the canvas into rectangles in which the front-most box does not change; each
    one's area goes to the cell and region it belongs to."""
    regions = layout.regions
    xs = _cuts([v for r in regions for v in (r.box[0], r.box[2])], width)  # (X + 1,)
    ys = _cuts([v for r in regions for v in (r.box[1], r.box[3])], height)  # (Y + 1,)
    cx, cy = (xs[1:] + xs[:-1]) / 2, (ys[1:] + ys[:-1]) / 2  # piece centres, (X,), (Y,)
    area = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :] * height * width  # (Y, X) in cells
    front = torch.full(area.shape, BACKGROUND, dtype=torch.long)  # (Y, X)
    for index in sorted(range(len(regions)), key=lambda i: regions[i].layer):  # back to front, stable
        x0, y0, x1, y1 = regions[index].box
        front[((cy > y0) & (cy < y1))[:, None] & ((cx > x0) & (cx < x1))[None, :]] = index
    cell = (cy * height).long().clamp(max=height - 1)[:, None] * width + (cx * width).long().clamp(max=width - 1)[
        None, :
    ]  # (Y, X) flat cell index
    visible = torch.zeros(len(regions), height * width, dtype=torch.float64)
    for index in range(len(regions)):
        mine = front == index
        visible[index].index_add_(0, cell[mine], area[mine])
    return visible.view(len(regions), height, width)


def _cuts(edges: Sequence[float], cells: int) -> torch.Tensor:
    """Sorted positions in [0, 1] of every cell edge and every given box edge."""
    grid = torch.arange(cells + 1, dtype=torch.float64) / cells
    return torch.unique(torch.cat([grid, torch.tensor(edges, dtype=torch.float64)]))


def token_weight_matrix(
    owner: torch.Tensor, region_positions: Sequence[Sequence[int]], num_tokens: int, config: GuidanceConfig
) -> torch.Tensor:
    """M of Cones 2 Eq. 7 for every (cell, token): inside_weight where the token's region owns the cell,
    other_region_weight where another region owns it, background_weight where none does; 0 for tokens no region
    binds. owner is (HW,); returns (HW, T)."""
    weights = torch.zeros(owner.numel(), num_tokens, dtype=torch.float32)
    for index, positions in enumerate(region_positions):
        column = torch.full((owner.numel(),), config.other_region_weight)
        column[owner == index] = config.inside_weight
        column[owner == BACKGROUND] = config.background_weight
        weights[:, list(positions)] = column[:, None]
    return weights


def self_attention_blocks(owner: torch.Tensor) -> torch.Tensor | None:
    """Bounded Attention's self-attention bound: a cell of one region may not attend to a cell of another
    region; background cells attend to and are attended by everything. owner is (HW,); returns (HW, HW) bool, or
    None above PRECOMPUTED_MAX_CELLS cells, where the processors build it per query chunk from the owner ids."""
    if owner.numel() > bounded_self_attention.PRECOMPUTED_MAX_CELLS:
        return None
    return bounded_self_attention.blocked_cells(owner, owner)  # (HW, HW)


def whole_self_bound(maps: ResolutionMaps) -> torch.Tensor:
    """The (HW, HW) bound of one resolution, also where `self_attention_blocks` left it to the processors."""
    if maps.self_blocked is not None:
        return maps.self_blocked
    return bounded_self_attention.blocked_cells(maps.owner, maps.owner)


def build_maps(
    layout: Layout,
    region_positions: Sequence[Sequence[int]],
    num_tokens: int,
    latent_size: tuple[int, int],
    levels: int,
    config: GuidanceConfig,
) -> dict[int, ResolutionMaps]:
    """The maps for every attention resolution, keyed by the number of query tokens (HW) the processor sees."""
    maps = {}
    for height, width in attention_resolutions(*latent_size, levels):
        owner = region_owners(layout, height, width).view(-1)
        visible = visible_coverage(layout, height, width).view(len(layout.regions), -1).float()  # (R, HW)
        fit_weights = visible / visible.amax(dim=-1, keepdim=True).clamp(min=1e-8)  # engines/box_fitting.py
        blocked = self_attention_blocks(owner) if config.bound_self_attention else None
        weights = token_weight_matrix(owner, region_positions, num_tokens, config)
        maps[height * width] = ResolutionMaps(
            height, width, owner, fit_weights, weights, blocked, bound_self=config.bound_self_attention
        )
    return maps


def sigma_at(alphas_cumprod: torch.Tensor, timestep: float) -> float:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), linearly interpolated for the fractional timesteps some schedulers use."""
    t = min(max(float(timestep), 0.0), len(alphas_cumprod) - 1.0)
    low, frac = int(math.floor(t)), t - math.floor(t)
    high = min(low + 1, len(alphas_cumprod) - 1)
    alpha = float(alphas_cumprod[low]) * (1 - frac) + float(alphas_cumprod[high]) * frac
    return math.sqrt((1 - alpha) / alpha)


def guidance_scale_at(config: GuidanceConfig, alphas_cumprod: torch.Tensor, timestep: float) -> float:
    """The time factor of η(t) = strength · log(1 + σ_t²) (· std(QKᵀ), taken per layer in the processor).
    Large while the picture's layout forms (high σ), fading to 0 as details are drawn. Zero outside the guided
    fraction of the trajectory, measured in timesteps so it means the same for every scheduler."""
    train_steps = len(alphas_cumprod)
    if config.strength == 0 or float(timestep) < (1 - config.guided_fraction) * train_steps:
        return 0.0
    return config.strength * math.log1p(sigma_at(alphas_cumprod, timestep) ** 2)
