"""Step previews: the first image's current latent as RGB, cheaply."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Latent → RGB linear approximations (notes/performance-anchors.md §7, ComfyUI latent_formats): rows = latent
# channels, columns = R, G, B, applied to the scaled latent; then a bias per colour.
PREVIEW_FACTORS = {
    "sd15": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
}
PREVIEW_FACTORS["sd2"] = PREVIEW_FACTORS["sd15"]  # same VAE


def previews_per_run(family: str) -> int:
    """A linear preview costs nothing, and ten per run are plenty; a VAE-decoded one (the demo model) costs about a
    tenth of a 64x64 run's denoising on a CPU, so it shows four."""
    return 10 if family in PREVIEW_FACTORS else 4


def latent_preview(bundle, latents: torch.Tensor) -> Image.Image:
    """The first image's latent (B, 4, h, w) as RGB: a linear map for SD-family VAEs, the (tiny) VAE otherwise."""
    latent = latents[:1].float()  # (1, 4, h, w)
    factors = PREVIEW_FACTORS.get(bundle.family)
    if factors is not None:
        weight = torch.tensor(factors[0], device=latent.device)  # (4, 3)
        bias = torch.tensor(factors[1], device=latent.device)
        rgb = torch.einsum("bchw,cr->bhwr", latent, weight) + bias  # (1, h, w, 3)
    else:
        vae = bundle.pipe.vae
        with torch.no_grad():
            decoded = vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor).sample.float()  # (1, 3, H, W)
        rgb = decoded.permute(0, 2, 3, 1)
    pixels = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))
