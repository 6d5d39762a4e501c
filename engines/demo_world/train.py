"""Train the embedded demo model (SD architecture, tiny) on procedural scenes.

    python -m engines.demo_world.train --out assets/demo_model [--minutes N]

The defaults are the recipe of the shipped model, sized for one GPU: 23 minutes on an H100 (4.5 for the VAE, the
latents and the grounding targets, 18 for the UNet at 0.097 s/step). On a CPU pass fewer --scenes / --steps / a
smaller --batch. Every stage resumes from --work: a run cut short (--minutes, SIGTERM) continues where it stopped,
on the same learning-rate plan. The work folder records its recipe, and a run with another recipe is refused.

Stages (each resumable; state lives in --work, default .cache/demo_train/):
  1. tokenizer  — CLIP BPE vocab of the world's words + every printable ASCII char (tokenizer.py)
  2. vae        — AutoencoderKL 64x64x3 -> 16x16x4, L1 + L2 + image-gradient L1 + tiny KL, then frozen;
                  scaling_factor = 1 / std of the latents (measured)
  3. latents    — the training scenes (rendered on every core) encoded once (posterior mean), cached as float16;
                  the decoder is then sharpened with the encoder frozen, so the cached latents stay valid
  4. unet       — UNet2DConditionModel + CLIPTextModel trained jointly from scratch: epsilon prediction,
                  min-SNR-5 loss weighting, AdamW with warmup + cosine decay, 10% empty captions (for CFG),
                  plus the grounding loss (grounding.py) that makes each object's words outline its pixels in
                  cross-attention, which is what lets layout guidance steer the model; EMA weights; checkpoints
                  every --ckpt-every steps, exports (EMA, fp16 safetensors) to --out every --export-every steps,
                  so there is always a usable model.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .grounding import AttentionRecorder, GroundingTargets, grounding_loss, grounding_targets
from .scenes import SIZE, random_scene
from .tokenizer import load_tokenizer, write_tokenizer

SEED = 1234
WARMUP_STEPS = 500
TEXT_HIDDEN = 128
SCHEDULER_KW = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------ models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=4,  # 16 top channels lost stripes
        norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0,
        mid_block_add_attention=False,  # fully convolutional: trains on crops
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' name for the number of heads in SD1.x-style UNets
        norm_num_groups=16,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(cfg)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------- data


def workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _render_chunk(seeds: range) -> tuple[np.ndarray, list[str]]:
    scenes = [random_scene(s) for s in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def render_scenes(start: int, n: int, chunk: int = 1000) -> tuple[np.ndarray, list[str]]:
    """Images [n, 64, 64, 3] uint8 and captions of seeds start..start+n-1, rendered on every core (spawned
    workers: the parent may hold a CUDA context, which forked children must not inherit)."""
    chunks = [range(s, min(start + n, s + chunk)) for s in range(start, start + n, chunk)]
    with multiprocessing.get_context("spawn").Pool(min(workers(), len(chunks))) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate([images for images, _ in parts]), [c for _, caps in parts for c in caps]


def to_unit_range(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """[n, 64, 64, 3] uint8 -> [n, 3, 64, 64] float in [-1, 1] on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


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


# ------------------------------------------------------------------------------------------------ stages


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (every stage trains this way)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def latent_aligned_crops(images: torch.Tensor, latents: torch.Tensor | None, g: torch.Generator):
    """One random 32x32 crop (at a multiple of 4 px, so it matches an 8x8 latent crop) of a batch."""
    ly, lx = torch.randint(0, 9, (2,), generator=g).tolist()
    crop = images[:, :, 4 * ly:4 * ly + 32, 4 * lx:4 * lx + 32]
    return crop, None if latents is None else latents[:, :, ly:ly + 8, lx:lx + 8]


def cosine_lr(lr: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warmup, then cosine decay from lr to floor * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(work: Path, steps: int, batch: int, device: torch.device, lr: float = 2e-3) -> None:
    out = work / "vae"
    if (out / "config.json").exists():
        log(f"vae: found {out}, skipping")
        return
    torch.manual_seed(SEED)
    vae = make_vae().to(device).train()
    log(f"vae: {n_params(vae) / 1e6:.2f} M params, training {steps} steps at batch {batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pool = to_unit_range(render_scenes(10_000_000, 16_384)[0], device)  # seeds apart from the UNet's scenes
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(steps):
        x, _ = latent_aligned_crops(pool[torch.randint(len(pool), (batch,), generator=g).to(device)], None, g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        loss = reconstruction_loss(rec, x) + 1e-5 * kl
        optimizer_step(opt, loss, vae.parameters(), cosine_lr(lr, step, steps, 50, 0.1))
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"kl {kl.item():.3f} {(time.time() - t0) / (step + 1):.3f}s/step")
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
    pool = to_unit_range(render_scenes(11_000_000, 16_384)[0], device)
    with torch.no_grad():
        lat = torch.cat([vae.encode(pool[i:i + 1024]).latent_dist.mean for i in range(0, len(pool), 1024)])
    std = lat.std().item()
    log(f"decoder: fine-tuning {sum(p.numel() for p in train_params) / 1e6:.2f} M params for {steps} steps")
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)
    vae.decoder.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g).to(device)
        x, z = latent_aligned_crops(pool[idx], lat[idx], g)
        rec = vae.decode(z + 0.1 * std * torch.randn_like(z)).sample
        loss = reconstruction_loss(rec, x)
        optimizer_step(opt, loss, train_params, cosine_lr(lr, step, steps, 50, 0.05))
        if (step + 1) % 100 == 0:
            log(f"decoder step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step")
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
        lat = np.concatenate([
            (vae.encode(to_unit_range(images[i:i + 1024], device)).latent_dist.mean * vae.config.scaling_factor)
            .half().cpu().numpy() for i in range(0, n, 1024)])  # [n, 4, 16, 16]
    log(f"latents: std {lat.astype(np.float32).std():.3f} mean {lat.astype(np.float32).mean():.3f}")
    np.savez(path, latents=lat, captions=np.array(captions))
    return path


def export(out: Path, work: Path, unet, text_encoder, tokenizer) -> None:
    """Write a diffusers StableDiffusionPipeline folder (fp16 safetensors, loads as fp32)."""
    import copy

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    half = lambda m: copy.deepcopy(m).to("cpu", torch.float16)  # noqa: E731
    pipe = StableDiffusionPipeline(
        vae=half(AutoencoderKL.from_pretrained(vae_dir(work))), text_encoder=half(text_encoder), tokenizer=tokenizer,
        unet=half(unet), scheduler=DDIMScheduler(**SCHEDULER_KW),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers records the storage dtype; ask for fp32 at load time (CPU half is slow / unsupported)
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("torch_dtype", "dtype"):
        if k in cfg:
            cfg[k] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    readme = out / "README.md"
    if readme.exists():
        (tmp / "README.md").write_text(readme.read_text())
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.rename(out, old)
        os.rename(tmp, out)
        import shutil

        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def _save_ckpt(path: Path, step: int, unet, te, ema_unet, ema_te, opt) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for prefix, m in (("unet.", unet), ("te.", te), ("ema_unet.", ema_unet), ("ema_te.", ema_te)):
        tensors.update({prefix + k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = (v.detach().reshape(-1) if v.dim() == 0 else v).cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "param_groups": json.dumps(sd["param_groups"])})
    os.replace(tmp, path)


def _load_ckpt(path: Path, unet, te, ema_unet, ema_te, opt) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    for prefix, m in (("unet.", unet), ("te.", te), ("ema_unet.", ema_unet), ("ema_te.", ema_te)):
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def _grounding_chunk(job: tuple[str, range]) -> GroundingTargets:
    tokenizer_dir, seeds = job
    return grounding_targets([random_scene(s) for s in seeds], load_tokenizer(tokenizer_dir))


def load_grounding_targets(work: Path, n: int) -> GroundingTargets:
    """Token positions and visible masks of every object of the first n training scenes (cached)."""
    from safetensors.torch import load_file, save_file

    path = work / f"grounding_{n}.safetensors"
    if path.exists():
        return GroundingTargets(**load_file(str(path)))
    log(f"grounding: collecting the objects of {n} scenes")
    jobs = [(str(work / "tokenizer"), range(s, min(n, s + 1000))) for s in range(0, n, 1000)]
    with multiprocessing.get_context("spawn").Pool(min(workers(), len(jobs))) as pool:
        parts = pool.map(_grounding_chunk, jobs)
    targets = GroundingTargets(torch.cat([t.positions for t in parts]), torch.cat([t.masks for t in parts]))
    save_file(dict(positions=targets.positions, masks=targets.masks), str(path))
    return targets


class TrainingSet:
    """The cached scenes on the training device: scaled latents, caption token ids and grounding targets."""

    def __init__(self, work: Path, latents_path: Path, tokenizer, device: torch.device, grounding: bool) -> None:
        data = np.load(latents_path)
        self.latents = torch.from_numpy(data["latents"].astype(np.float32)).to(device)  # [N, 4, 16, 16]
        captions = list(data["captions"])
        tokenize = lambda texts: tokenizer(texts, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                                           return_tensors="pt").input_ids.to(device)
        self.ids = tokenize(captions)  # [N, 77]
        self.empty_ids = tokenize([""])  # [1, 77]
        self.targets = None
        if grounding:
            t = load_grounding_targets(work, len(captions))
            self.targets = GroundingTargets(t.positions.to(device), t.masks.to(device))

    def __len__(self) -> int:
        return len(self.latents)


def write_stats(work: Path, step: int, steps: int, batch: int, lr: float, losses: list[torch.Tensor],
                sec_per_step: float) -> None:
    loss = torch.stack(losses).mean().item() if losses else float("nan")
    (work / "train_stats.json").write_text(json.dumps(dict(
        step=step, batch=batch, lr=lr, steps=steps, loss_last100=loss, sec_per_step=sec_per_step)))


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int) -> None:
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_unet(work: Path, out: Path, latents_path: Path, steps: int, batch: int, lr: float, minutes: float,
               log_every: int, ckpt_every: int, export_every: int, device: torch.device,
               ground_weight: float = 0.0, ground_after: int = 0) -> None:
    import copy
    import signal

    from diffusers import DDPMScheduler

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(work / "tokenizer")
    unet, te = make_unet().to(device).train(), make_text_encoder(tokenizer).to(device).train()
    ema_unet, ema_te = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)
    log(f"unet {n_params(unet) / 1e6:.2f} M params, text encoder {n_params(te) / 1e6:.2f} M params, on {device}")
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    ckpt = work / "ckpt.safetensors"
    step = 0
    if ckpt.exists():
        step = _load_ckpt(ckpt, unet, te, ema_unet, ema_te, opt)
        log(f"resumed from {ckpt} at step {step}")
    data = TrainingSet(work, latents_path, tokenizer, device, grounding=ground_weight > 0)
    log(f"{len(data)} cached scenes, latent std {data.latents.std():.3f}")
    recorder = None
    if ground_weight > 0:
        recorder = AttentionRecorder()
        unet.set_attn_processor(recorder)
        log(f"grounding loss weight {ground_weight} from step {ground_after}")
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k != "set_alpha_to_one"})
    abar = sched.alphas_cumprod.float().to(device)  # [1000]
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    g = torch.Generator().manual_seed(SEED + step)  # batches; a resume continues a (different but fixed) stream
    g_noise = torch.Generator(device).manual_seed(SEED + step)
    first_step, t_start, losses, ground_losses = step, time.time(), [], []  # losses stay on the device: no sync
    last_export = time.time()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(now=True))  # finish the step, save, exit
    while step < steps:
        if minutes and time.time() - t_start > minutes * 60:
            log(f"time budget of {minutes} min reached at step {step}")
            break
        if stop["now"]:
            log(f"SIGTERM: stopping at step {step}")
            break
        idx = torch.randint(len(data), (batch,), generator=g).to(device)
        drop = (torch.rand(batch, generator=g) < 0.1).to(device)  # empty captions, for classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        x0 = data.latents[idx]  # [B, 4, 16, 16]
        ids = torch.where(drop.view(-1, 1), data.empty_ids, data.ids[idx])  # [B, 77]
        noise = torch.randn(x0.shape, generator=g_noise, device=device)
        xt = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
        if recorder is not None:
            recorder.maps.clear()
        pred = unet(xt, t, encoder_hidden_states=te(ids)[0]).sample
        loss_per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # [B]
        loss = (loss_per * weight[t]).mean()
        if recorder is not None and step >= ground_after:
            positions = data.targets.positions[idx].masked_fill(drop.view(-1, 1, 1), -1)
            ground = grounding_loss(recorder.maps, positions, data.targets.masks[idx])
            loss = loss + ground_weight * ground
            ground_losses = (ground_losses + [ground.detach()])[-100:]
        cur = cosine_lr(lr, step, steps, WARMUP_STEPS, 0.1)
        optimizer_step(opt, loss, params, cur)
        step += 1
        ema_update(ema_params, params, step)
        losses = (losses + [loss_per.mean().detach()])[-100:]
        if step % log_every == 0:
            grounding = f" grounding {torch.stack(ground_losses).mean():.4f}" if ground_losses else ""
            log(f"step {step}/{steps} loss {torch.stack(losses[-log_every:]).mean():.4f}{grounding} lr {cur:.2e} "
                f"{(time.time() - t_start) / (step - first_step):.3f}s/step")
        if step % ckpt_every == 0 or step == steps:
            _save_ckpt(ckpt, step, unet, te, ema_unet, ema_te, opt)
        if step % export_every == 0 or step == steps or time.time() - last_export > 600:
            last_export = time.time()
            export(out, work, ema_unet, ema_te, tokenizer)
            write_stats(work, step, steps, batch, lr, losses, (time.time() - t_start) / max(1, step - first_step))
            log(f"exported EMA weights to {out} at step {step}")
    _save_ckpt(ckpt, step, unet, te, ema_unet, ema_te, opt)
    export(out, work, ema_unet, ema_te, tokenizer)
    write_stats(work, step, steps, batch, lr, losses, (time.time() - t_start) / max(1, step - first_step))
    log(f"done at step {step}; exported to {out}")


def export_only(work: Path, out: Path) -> None:
    """Re-export the EMA weights of the last checkpoint (e.g. after the decoder stage finished)."""
    import copy

    tokenizer = load_tokenizer(work / "tokenizer")
    unet, te = make_unet(), make_text_encoder(tokenizer)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(te)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()))
    step = _load_ckpt(work / "ckpt.safetensors", unet, te, ema_unet, ema_te, opt)
    export(out, work, ema_unet, ema_te, tokenizer)
    log(f"exported step {step} (EMA) with {vae_dir(work)} to {out}")


def bench(work: Path, batch: int, device: torch.device, n: int = 20) -> None:
    """Seconds per UNet + text encoder training step (grounding loss included) and per VAE step, on `device`."""
    tok = load_tokenizer(work / "tokenizer")
    unet, te, vae = make_unet().to(device), make_text_encoder(tok).to(device), make_vae().to(device)
    log(f"params: unet {n_params(unet) / 1e6:.2f} M, te {n_params(te) / 1e6:.2f} M, vae {n_params(vae) / 1e6:.2f} M")
    recorder = AttentionRecorder()
    unet.set_attn_processor(recorder)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    targets = grounding_targets([random_scene(s) for s in range(batch)], tok)
    positions, masks = targets.positions.to(device), targets.masks.to(device)
    ids = tok([random_scene(s).caption for s in range(batch)], padding="max_length", max_length=77,
              return_tensors="pt").input_ids.to(device)

    def unet_step() -> None:
        recorder.maps.clear()
        x = torch.randn(batch, 4, 16, 16, device=device)
        pred = unet(x, torch.randint(0, 1000, (batch,), device=device), encoder_hidden_states=te(ids)[0]).sample
        optimizer_step(opt, pred.pow(2).mean() + 0.05 * grounding_loss(recorder.maps, positions, masks), params, 1e-4)

    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4)

    def vae_step() -> None:
        x = torch.randn(64, 3, 32, 32, device=device)
        optimizer_step(vopt, reconstruction_loss(vae(x).sample, x), vae.parameters(), 1e-4)

    for name, fn in ((f"unet+te step at batch {batch}", unet_step), ("vae step at batch 64", vae_step)):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        log(f"{name}: {(time.time() - t0) / n:.4f} s")


RECIPE_ARGS = ("vae_steps", "vae_batch", "decoder_steps", "scenes", "steps", "batch", "lr", "ground_weight",
               "ground_after")


def check_recipe(work: Path, recipe: dict) -> None:
    """Every stage resumes from `work`, so a run must not continue another recipe's state (another VAE's latents,
    another schedule's checkpoint): the first run records its recipe, later runs must match it."""
    path = work / "recipe.json"
    recipe = dict(recipe, vae_channels=list(make_vae().config.block_out_channels))
    if not path.exists():
        path.write_text(json.dumps(recipe, indent=2))
        return
    recorded = json.loads(path.read_text())
    changed = [f"{k}: {recorded.get(k)} -> {v}" for k, v in recipe.items() if recorded.get(k) != v]
    if changed:
        raise SystemExit(f"{work} holds the state of another recipe ({'; '.join(changed)}). "
                         f"Pass another --work, or delete {work} to start over.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/demo_model")
    ap.add_argument("--work", default=".cache/demo_train")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="wall-clock budget of this run's UNet stage (0 = none); run again to resume")
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--decoder-steps", type=int, default=2000, help="decoder sharpening steps (0 = skip)")
    ap.add_argument("--scenes", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=11_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--export-every", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--ground-weight", type=float, default=0.05,
                    help="weight of the grounding loss that ties object words to object pixels (0 = off)")
    ap.add_argument("--ground-after", type=int, default=0, help="first step that uses the grounding loss")
    ap.add_argument("--prepare-only", action="store_true", help="stop after the VAE, latent and decoder stages")
    ap.add_argument("--bench", action="store_true", help="only measure seconds per step")
    ap.add_argument("--export-only", action="store_true", help="only re-export the last checkpoint's EMA weights")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    write_tokenizer(work / "tokenizer")
    if a.bench:
        bench(work, a.batch, device)
        return
    log(f"args: {vars(a)}")
    if a.export_only:
        export_only(work, out)
        return
    check_recipe(work, {k: v for k, v in vars(a).items() if k in RECIPE_ARGS})
    train_vae(work, a.vae_steps, a.vae_batch, device)
    latents_path = cache_latents(work, a.scenes, device)
    if a.decoder_steps:
        finetune_decoder(work, a.decoder_steps, a.vae_batch, device)
    if a.ground_weight > 0:
        load_grounding_targets(work, a.scenes)
    if a.prepare_only:
        return
    train_unet(work, out, latents_path, a.steps, a.batch, a.lr, a.minutes, a.log_every, a.ckpt_every,
               a.export_every, device, a.ground_weight, a.ground_after)


if __name__ == "__main__":
    main()
