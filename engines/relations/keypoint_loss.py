"""DreamRelation's two extra training terms (§3.4.2 and its public code): the keypoint matching loss and the
cross-attention loss.

Keypoint matching (Eq. 5–7). From the UNet's prediction, the clean latent the step points at (Eq. 5):

    x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t          (ε-prediction;  v-prediction: x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂)

and, at each object's keypoints p_k in the target image and p'_k in the object's own image, scaled to the latent's
size and read bilinearly (Eq. 6–7):

    L_KML = 1/K Σ_k ‖x̂₀(p_k) − z_obj(p'_k)‖²

z_obj is the VAE latent of the object alone (engines/relations/training.py: the example with everything but the
object greyed out). As in the public code, the term counts only at t ≤ T/3, where x̂₀ is sharp enough to have a
pose; its weight is λ = 0.1.

Cross-attention loss (the public code's, weight 0.001): for each object, its words' attention averaged over the
background cells minus averaged over its own cells — it keeps each phrase on its object while the LoRA changes how
the cross-attention reads the words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVE_SHARE = 1 / 3  # L_KML counts at t ≤ T/3


def predicted_clean(noisy: torch.Tensor, prediction: torch.Tensor, alphas: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. 5: x̂₀ from x_t (B, C, h, w), the UNet's output and ᾱ_t (B,)."""
    alpha = alphas.view(-1, 1, 1, 1).to(noisy.dtype)  # (B, 1, 1, 1)
    if kind == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()


def sample_at(latents: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features of latents (B, C, h, w) at points (B, K, 2) given as (x, y) in [0, 1] → (B, K, C)."""
    grid = (points * 2 - 1)[:, :, None].to(latents.dtype)  # (B, K, 1, 2) in grid_sample's [-1, 1]
    features = F.grid_sample(latents, grid, mode="bilinear", align_corners=False)  # (B, C, K, 1)
    return features[..., 0].transpose(1, 2)  # (B, K, C)


def keypoint_matching_loss(
    clean: torch.Tensor,
    own: torch.Tensor,
    target_points: torch.Tensor,
    own_points: torch.Tensor,
    valid: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """Eq. 6–7, averaged over the objects' valid keypoints of the active samples.

    clean: x̂₀ (B, C, h, w); own: the objects' own latents (B, O, C, h, w); target_points / own_points (B, O, K, 2);
    valid (B, O, K) bool (objects have different numbers of keypoints); active (B,) bool (t ≤ T/3)."""
    batch, objects, keypoints, _ = target_points.shape
    predicted = sample_at(clean, target_points.flatten(1, 2)).view(batch, objects, keypoints, -1)  # (B, O, K, C)
    wanted = sample_at(own.flatten(0, 1), own_points.flatten(0, 1)).view(batch, objects, keypoints, -1)
    squared = (predicted.float() - wanted.float()).pow(2).sum(-1)  # (B, O, K): ‖·‖² over channels
    weight = (valid & active[:, None, None]).float()  # (B, O, K)
    return (squared * weight).sum() / weight.sum().clamp(min=1)


def attention_loss(maps: Sequence[torch.Tensor], positions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers and objects of (mean attention on the background − mean attention on the object).

    maps: per cross-attention layer, probabilities (B, N, T) with N a square number of cells; positions (B, O, W)
    token positions of each object's words (-1: none); masks (B, O, S, S) the objects' masks at any side S."""
    terms = []
    safe = positions.clamp(min=0)  # (B, O, W)
    for probabilities in maps:
        batch, cells, tokens = probabilities.shape
        side = int(round(cells**0.5))
        gathered = torch.gather(probabilities[:, None].expand(-1, safe.shape[1], -1, -1), 3,
                                safe[:, :, None].expand(-1, -1, cells, -1).clamp(max=tokens - 1))  # fmt: skip
        attention = (gathered * (positions >= 0)[:, :, None].float()).sum(-1)  # (B, O, N): the object's words
        inside = F.adaptive_avg_pool2d(masks.flatten(0, 1)[:, None].float(), side).view(batch, -1, cells)  # (B, O, N)
        outside = 1 - inside
        on_object = (attention * inside).sum(-1) / inside.sum(-1).clamp(min=1e-6)  # (B, O)
        on_background = (attention * outside).sum(-1) / outside.sum(-1).clamp(min=1e-6)
        terms.append((on_background - on_object).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())
