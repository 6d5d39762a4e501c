"""Train the embedded demo model (SD architecture, tiny) on procedural scenes, on a CPU.

    python -m engines.demo_world.train --out assets/demo_model [--minutes N]

Stages (each resumable; state lives in --work, default .cache/demo_train/):
  1. tokenizer  — CLIP BPE vocab of the world's words + every printable ASCII char (tokenizer.py)
  2. vae        — AutoencoderKL 64x64x3 -> 16x16x4, L1+L2 reconstruction + tiny KL, then frozen;
                  scaling_factor = 1 / std of the latents (measured)
  3. latents    — the training scenes encoded once (posterior mean), cached as float16
  4. unet       — UNet2DConditionModel + CLIPTextModel trained jointly from scratch: epsilon prediction,
                  min-SNR-5 loss weighting, AdamW with warmup + cosine decay, 10% empty captions (for CFG),
                  plus the grounding loss (grounding.py) that makes each object's words outline its pixels in
                  cross-attention, which is what lets layout guidance steer the model; EMA weights; checkpoints every --ckpt-every steps, exports (EMA, fp16 safetensors) to --out
                  every --export-every steps so there is always a usable model.
"""
from __future__ import annotations

import argparse
import json
import math
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
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0,
        mid_block_add_attention=False,  # fully convolutional: trains on crops, cheap on CPU
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


def scene_images(start: int, n: int) -> torch.Tensor:
    """[n, 3, 64, 64] float in [-1, 1] for seeds start..start+n-1."""
    imgs = np.stack([random_scene(s).image for s in range(start, start + n)])  # [n, 64, 64, 3] uint8
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------ stages


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (every stage trains this way)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_vae(work: Path, steps: int, batch: int = 16, lr: float = 2e-3) -> None:
    out = work / "vae"
    if (out / "config.json").exists():
        log(f"vae: found {out}, skipping")
        return
    torch.manual_seed(SEED)
    vae = make_vae().train()
    log(f"vae: {n_params(vae) / 1e6:.2f} M params, training {steps} steps at batch {batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pool = scene_images(10_000_000, 4096)  # held-apart seeds from the UNet's training scenes
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g)
        oy, ox = (torch.randint(0, 9, (2,), generator=g) * 4).tolist()  # latent-aligned 32x32 crop
        x = pool[idx][:, :, oy:oy + 32, ox:ox + 32]  # [B, 3, 32, 32]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-5 * kl
        cur = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        optimizer_step(opt, loss, vae.parameters(), cur)
        if (step + 1) % 25 == 0:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"kl {kl.item():.3f} {(time.time() - t0) / (step + 1):.2f}s/step")
    step = steps
    vae.eval()
    with torch.no_grad():
        x = scene_images(20_000_000, 256)
        z = vae.encode(x).latent_dist.mean
        std = z.std().item()
        rec = vae.decode(z).sample
        err = (rec - x).abs().mul(127.5).mean().item()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    log(f"vae: {step} steps, latent std {std:.4f} -> scaling_factor {1 / std:.4f}, held-out L1 {err:.2f}/255")
    vae.save_pretrained(out, safe_serialization=True)
    (work / "vae_stats.json").write_text(json.dumps(dict(steps=step, latent_std=std, l1_255=err, batch=batch)))


def finetune_decoder(work: Path, steps: int, batch: int = 16, lr: float = 1e-3) -> None:
    """Sharpen the decoder with the encoder frozen, so the latent space (and cached latents, and a UNet trained on
    them) stay valid: L1 + L2 + L1 of image gradients on 32x32 crops decoded from 8x8 latent crops, with mild
    latent noise so the decoder tolerates the UNet's imperfect latents. Writes work/vae_ft."""
    from diffusers import AutoencoderKL

    out = work / "vae_ft"
    if (out / "config.json").exists():
        log(f"decoder: found {out}, skipping")
        return
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.requires_grad_(False)
    train_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in train_params:
        p.requires_grad_(True)
    pool = scene_images(11_000_000, 4096)  # [4096, 3, 64, 64]
    with torch.no_grad():
        lat = torch.cat([vae.encode(pool[i:i + 256]).latent_dist.mean for i in range(0, len(pool), 256)])
    std = lat.std().item()
    log(f"decoder: fine-tuning {sum(p.numel() for p in train_params) / 1e6:.2f} M params for {steps} steps")
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)
    vae.decoder.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g)
        ly, lx = torch.randint(0, 9, (2,), generator=g).tolist()
        z = lat[idx][:, :, ly:ly + 8, lx:lx + 8]  # [B, 4, 8, 8]
        z = z + 0.1 * std * torch.randn(z.shape, generator=g)
        x = pool[idx][:, :, 4 * ly:4 * ly + 32, 4 * lx:4 * lx + 32]  # [B, 3, 32, 32]
        rec = vae.decode(z).sample
        gx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        gy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + F.l1_loss(gx(rec), gx(x)) + F.l1_loss(gy(rec), gy(x))
        cur = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        optimizer_step(opt, loss, train_params, cur)
        if (step + 1) % 50 == 0:
            log(f"decoder step {step + 1}/{steps} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} "
                f"{(time.time() - t0) / (step + 1):.2f}s/step")
    vae.eval()
    with torch.no_grad():
        x = scene_images(20_000_000, 256)
        err = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mul(127.5).mean().item()
    log(f"decoder: held-out L1 {err:.2f}/255")
    tmp = work / "vae_ft.tmp"
    vae.save_pretrained(tmp, safe_serialization=True)
    os.rename(tmp, out)
    (work / "decoder_stats.json").write_text(json.dumps(dict(steps=steps, batch=batch, l1_255=err)))


def vae_dir(work: Path) -> Path:
    """The VAE to ship: the decoder-sharpened one when it exists (same encoder, same latents)."""
    return work / "vae_ft" if (work / "vae_ft" / "config.json").exists() else work / "vae"


def cache_latents(work: Path, n: int) -> Path:
    from diffusers import AutoencoderKL

    path = work / f"latents_{n}.npz"
    if path.exists():
        log(f"latents: found {path}")
        return path
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    sf = vae.config.scaling_factor
    lats, caps = [], []
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, n, 256):
            m = min(256, n - start)
            scenes = [random_scene(s) for s in range(start, start + m)]
            x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
            lats.append((vae.encode(x).latent_dist.mean * sf).half().numpy())  # [m, 4, 16, 16]
            caps += [s.caption for s in scenes]
            if (start // 256) % 20 == 0:
                log(f"latents {start + m}/{n} ({time.time() - t0:.0f}s)")
    lat = np.concatenate(lats)
    log(f"latents: std {lat.astype(np.float32).std():.3f} mean {lat.astype(np.float32).mean():.3f}")
    np.savez(path, latents=lat, captions=np.array(caps))
    return path


def export(out: Path, work: Path, unet, text_encoder, tokenizer) -> None:
    """Write a diffusers StableDiffusionPipeline folder (fp16 safetensors, loads as fp32)."""
    import copy

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir(work))
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=DDIMScheduler(**SCHEDULER_KW),
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
        tensors.update({prefix + k: v.detach().contiguous() for k, v in m.state_dict().items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().reshape(-1).contiguous() if v.dim() == 0 else v.contiguous()
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


def load_grounding_targets(work: Path, n: int, tokenizer) -> GroundingTargets:
    """Token positions and visible masks of every object of the first n training scenes (cached)."""
    from safetensors.torch import load_file, save_file

    path = work / f"grounding_{n}.safetensors"
    if path.exists():
        return GroundingTargets(**load_file(str(path)))
    log(f"grounding: collecting the objects of {n} scenes")
    parts = [grounding_targets([random_scene(s) for s in range(start, min(n, start + 1000))], tokenizer)
             for start in range(0, n, 1000)]
    targets = GroundingTargets(torch.cat([t.positions for t in parts]), torch.cat([t.masks for t in parts]))
    save_file(dict(positions=targets.positions, masks=targets.masks), str(path))
    return targets


def train_unet(work: Path, out: Path, latents_path: Path, steps: int, batch: int, lr: float, minutes: float,
               log_every: int, ckpt_every: int, export_every: int, ground_weight: float = 0.0,
               ground_after: int = 0) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(work / "tokenizer")
    unet, te = make_unet().train(), make_text_encoder(tokenizer).train()
    import copy

    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    log(f"unet {n_params(unet) / 1e6:.2f} M params, text encoder {n_params(te) / 1e6:.2f} M params")
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ckpt = work / "ckpt.safetensors"
    step = 0
    if ckpt.exists():
        step = _load_ckpt(ckpt, unet, te, ema_unet, ema_te, opt)
        log(f"resumed from {ckpt} at step {step}")
    data = np.load(latents_path)
    lat = torch.from_numpy(data["latents"].astype(np.float32))  # [N, 4, 16, 16]
    caps = list(data["captions"])
    ids_all = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids  # [1, 77]
    log(f"{len(caps)} cached scenes, latent std {lat.std():.3f}")
    recorder, targets = None, None
    if ground_weight > 0:
        targets = load_grounding_targets(work, len(caps), tokenizer)
        recorder = AttentionRecorder()
        unet.set_attn_processor(recorder)
        log(f"grounding loss weight {ground_weight} from step {ground_after}")
    ground_losses: list[float] = []
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k != "set_alpha_to_one"})
    abar = sched.alphas_cumprod.float()  # [1000]
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    g = torch.Generator().manual_seed(SEED + step)  # resume continues a (different but fixed) stream
    warmup = 150
    t_start, losses = time.time(), []
    last_export = time.time()
    stop = {"now": False}

    def _on_term(signum, frame):  # SIGTERM: finish the step, checkpoint, export, exit
        stop["now"] = True

    import signal

    signal.signal(signal.SIGTERM, _on_term)
    while step < steps:
        if minutes and time.time() - t_start > minutes * 60:
            log(f"time budget of {minutes} min reached at step {step}")
            break
        if stop["now"]:
            log(f"SIGTERM: stopping at step {step}")
            break
        idx = torch.randint(len(lat), (batch,), generator=g)
        x0 = lat[idx]  # [B, 4, 16, 16]
        ids = ids_all[idx].clone()  # [B, 77]
        drop = torch.rand(batch, generator=g) < 0.1
        ids[drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        cond = te(ids)[0]  # [B, 77, 128]
        if recorder is not None:
            recorder.maps.clear()
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss_per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # [B]
        loss = (loss_per * weight[t]).mean()
        if recorder is not None and step >= ground_after:
            positions = targets.positions[idx].masked_fill(drop.view(-1, 1, 1), -1)
            ground = grounding_loss(recorder.maps, positions, targets.masks[idx])
            loss = loss + ground_weight * ground
            ground_losses.append(ground.item())
        cur = lr * min(1.0, (step + 1) / warmup)
        if step >= warmup:
            cur = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        optimizer_step(opt, loss, params, cur)
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
        losses.append(loss_per.mean().item())
        if step % log_every == 0:
            el = time.time() - t_start
            grounding = f" grounding {np.mean(ground_losses[-log_every:]):.4f}" if ground_losses else ""
            log(f"step {step}/{steps} loss {np.mean(losses[-log_every:]):.4f}{grounding} lr {cur:.2e} "
                f"{el / max(1, len(losses)):.2f}s/step")
        if step % ckpt_every == 0 or step == steps:
            _save_ckpt(ckpt, step, unet, te, ema_unet, ema_te, opt)
        if step % export_every == 0 or step == steps or time.time() - last_export > 600:
            last_export = time.time()
            export(out, work, ema_unet, ema_te, tokenizer)
            (work / "train_stats.json").write_text(json.dumps(dict(
                step=step, batch=batch, lr=lr, steps=steps, loss_last100=float(np.mean(losses[-100:])),
                sec_per_step=(time.time() - t_start) / max(1, len(losses)))))
            log(f"exported EMA weights to {out} at step {step}")
    _save_ckpt(ckpt, step, unet, te, ema_unet, ema_te, opt)
    export(out, work, ema_unet, ema_te, tokenizer)
    (work / "train_stats.json").write_text(json.dumps(dict(
        step=step, batch=batch, lr=lr, steps=steps, loss_last100=float(np.mean(losses[-100:] or [float("nan")])),
        sec_per_step=(time.time() - t_start) / max(1, len(losses)))))
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


def bench(work: Path, batch: int, n: int = 5) -> None:
    tok = load_tokenizer(work / "tokenizer")
    unet, te = make_unet(), make_text_encoder(tok)
    vae = make_vae()
    log(f"params: unet {n_params(unet) / 1e6:.2f} M, te {n_params(te) / 1e6:.2f} M, vae {n_params(vae) / 1e6:.2f} M")
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=1e-4)
    ids = tok(["a red ball on grass"] * batch, padding="max_length", max_length=77, return_tensors="pt").input_ids
    for i in range(n + 1):
        if i == 1:
            t0 = time.time()
        x = torch.randn(batch, 4, 16, 16)
        pred = unet(x, torch.randint(0, 1000, (batch,)), encoder_hidden_states=te(ids)[0]).sample
        loss = pred.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"unet+te step at batch {batch}: {(time.time() - t0) / n:.3f} s")
    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    for i in range(n + 1):
        if i == 1:
            t0 = time.time()
        x = torch.randn(32, 3, 64, 64)
        rec = vae(x).sample
        loss = rec.pow(2).mean()
        vopt.zero_grad()
        loss.backward()
        vopt.step()
    log(f"vae step at batch 32: {(time.time() - t0) / n:.3f} s")
    with torch.no_grad():
        t0 = time.time()
        vae.encode(torch.randn(256, 3, 64, 64))
        log(f"vae encode 256: {time.time() - t0:.3f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/demo_model")
    ap.add_argument("--work", default=".cache/demo_train")
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of the UNet stage (0 = none)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--scenes", type=int, default=24_000)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--export-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ground-weight", type=float, default=0.05,
                    help="weight of the grounding loss that ties object words to object pixels (0 = off)")
    ap.add_argument("--ground-after", type=int, default=0, help="first step that uses the grounding loss")
    ap.add_argument("--decoder-steps", type=int, default=1500, help="decoder sharpening steps (0 = skip)")
    ap.add_argument("--decoder-only", action="store_true", help="only run the decoder stage (needs the vae stage)")
    ap.add_argument("--bench", action="store_true", help="only measure seconds per step")
    ap.add_argument("--export-only", action="store_true", help="only re-export the last checkpoint's EMA weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    write_tokenizer(work / "tokenizer")
    if a.bench:
        bench(work, a.batch)
        return
    log(f"args: {vars(a)}")
    if a.export_only:
        export_only(work, out)
        return
    if a.decoder_only:
        finetune_decoder(work, a.decoder_steps)
        return
    train_vae(work, a.vae_steps)
    lp = cache_latents(work, a.scenes)
    if a.decoder_steps:
        finetune_decoder(work, a.decoder_steps)
    train_unet(work, out, lp, a.steps, a.batch, a.lr, a.minutes, a.log_every, a.ckpt_every, a.export_every,
               a.ground_weight, a.ground_after)


if __name__ == "__main__":
    main()
