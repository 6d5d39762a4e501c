"""The demo trainer's first stages: the VAE, its sharpened decoder, and the training scenes' cached latents.

The VAE (64x64x3 -> 16x16x4) trains on 32x32 crops with L1 + L2 + image-gradient L1 and a tiny KL, then is frozen;
its scaling_factor is 1 / the measured std of the latents, as SD's is. The training scenes are encoded once
(posterior mean) and cached as float16. The decoder is then sharpened with the encoder frozen, so the cached latents,
and a UNet trained on them, stay valid. The scenes the VAE sees (seeds from 10,000,000) are apart from the UNet's
(seeds from 0), and held-out errors are measured on seeds from 20,000,000.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .models import make_vae, n_params
from .optim import SEED, cosine_lr, log, optimizer_step
from .training_data import latent_aligned_crops, render_scenes, to_unit_range


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two images: it keeps stripes and dots sharp,
    which L1/L2 alone blur away."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + image_gradient_l1(rec, x)


def held_out_l1(vae, device: torch.device) -> float:
    """Mean absolute reconstruction error (0-255 scale) on 256 held-out scenes."""
    x = to_unit_range(render_scenes(20_000_000, 256)[0], device)
    with torch.no_grad():
        return (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mul(127.5).mean().item()


def train_vae(work: Path, steps: int, batch: int, device: torch.device, lr: float = 2e-3) -> None:
    out = work / "vae"
    if (out / "config.json").exists():
        log(f"vae: found {out}, skipping")
        return
    torch.manual_seed(SEED)
    vae = make_vae().to(device).train()
    log(f"vae: {n_params(vae) / 1e6:.2f} M params, training {steps} steps at batch {batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pool = to_unit_range(render_scenes(10_000_000, 16_384)[0], device)  # [16384, 3, 64, 64]
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(steps):
        x, _ = latent_aligned_crops(pool[torch.randint(len(pool), (batch,), generator=g).to(device)], None, g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample  # [B, 3, 32, 32]
        kl = post.kl().mean() / (4 * 8 * 8)  # per latent element
        loss = reconstruction_loss(rec, x) + 1e-5 * kl
        optimizer_step(opt, loss, vae.parameters(), cosine_lr(lr, step, steps, 50, 0.1))
        if (step + 1) % 100 == 0:
            log(
                f"vae step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"kl {kl.item():.3f} {(time.time() - t0) / (step + 1):.3f}s/step"
            )
    vae.eval()
    with torch.no_grad():
        std = vae.encode(to_unit_range(render_scenes(20_000_000, 256)[0], device)).latent_dist.mean.std().item()
    err = held_out_l1(vae, device)
    vae.register_to_config(scaling_factor=float(1.0 / std))
    log(f"vae: {steps} steps, latent std {std:.4f} -> scaling_factor {1 / std:.4f}, held-out L1 {err:.2f}/255")
    vae.save_pretrained(out, safe_serialization=True)
    (work / "vae_stats.json").write_text(json.dumps(dict(steps=steps, latent_std=std, l1_255=err, batch=batch)))


def finetune_decoder(work: Path, steps: int, batch: int, device: torch.device, lr: float = 1e-3) -> None:
    """Sharpen the decoder with the encoder frozen, so the latent space (and cached latents, and a UNet trained on
    them) stay valid: reconstruction loss on 32x32 crops decoded from 8x8 latent crops, with mild latent noise so
    the decoder tolerates the UNet's imperfect latents. Writes work/vae_ft."""
    from diffusers import AutoencoderKL

    out = work / "vae_ft"
    if (out / "config.json").exists():
        log(f"decoder: found {out}, skipping")
        return
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL.from_pretrained(work / "vae").to(device)
    vae.requires_grad_(False)
    train_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in train_params:
        p.requires_grad_(True)
    pool = to_unit_range(render_scenes(11_000_000, 16_384)[0], device)  # [16384, 3, 64, 64]
    with torch.no_grad():
        lat = torch.cat([vae.encode(pool[i : i + 1024]).latent_dist.mean for i in range(0, len(pool), 1024)])
    std = lat.std().item()
    log(f"decoder: fine-tuning {sum(p.numel() for p in train_params) / 1e6:.2f} M params for {steps} steps")
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)
    vae.decoder.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g).to(device)
        x, z = latent_aligned_crops(pool[idx], lat[idx], g)
        rec = vae.decode(z + 0.1 * std * torch.randn_like(z)).sample  # [B, 3, 32, 32]
        loss = reconstruction_loss(rec, x)
        optimizer_step(opt, loss, train_params, cosine_lr(lr, step, steps, 50, 0.05))
        if (step + 1) % 100 == 0:
            log(
                f"decoder step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step"
            )
    vae.eval()
    err = held_out_l1(vae, device)
    log(f"decoder: held-out L1 {err:.2f}/255")
    tmp = work / "vae_ft.tmp"
    vae.save_pretrained(tmp, safe_serialization=True)
    os.rename(tmp, out)
    (work / "decoder_stats.json").write_text(json.dumps(dict(steps=steps, batch=batch, l1_255=err)))


def vae_dir(work: Path) -> Path:
    """The VAE to ship: the decoder-sharpened one when it exists (same encoder, same latents)."""
    return work / "vae_ft" if (work / "vae_ft" / "config.json").exists() else work / "vae"


def cache_latents(work: Path, n: int, device: torch.device) -> Path:
    from diffusers import AutoencoderKL

    path = work / f"latents_{n}.npz"
    if path.exists():
        log(f"latents: found {path}")
        return path
    vae = AutoencoderKL.from_pretrained(work / "vae").to(device).eval()
    t0 = time.time()
    images, captions = render_scenes(0, n)
    log(f"latents: rendered {n} scenes in {time.time() - t0:.0f}s")
    with torch.no_grad():
        lat = np.concatenate(
            [
                (vae.encode(to_unit_range(images[i : i + 1024], device)).latent_dist.mean * vae.config.scaling_factor)
                .half()
                .cpu()
                .numpy()
                for i in range(0, n, 1024)
            ]
        )  # [n, 4, 16, 16]
    log(f"latents: std {lat.astype(np.float32).std():.3f} mean {lat.astype(np.float32).mean():.3f}")
    np.savez(path, latents=lat, captions=np.array(captions))
    return path
