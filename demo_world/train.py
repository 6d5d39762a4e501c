"""Train the embedded demo model (SD architecture, tiny) on procedural scenes.

    python -m demo_world.train --out assets/demo_model [--minutes N]

The defaults are the recipe of the shipped model, sized for one GPU (how long it took, and on what, is in
docs/demo-model.md). On a CPU pass fewer --scenes / --steps / a smaller --batch. Every stage resumes from --work: a
run cut short (--minutes, SIGTERM) continues where it stopped, on the same learning-rate plan. The work folder
records its recipe, and a run with another recipe is refused.

Stages (each resumable; state lives in --work, default .cache/demo_train/):
  1. tokenizer  — CLIP BPE vocab of the world's words + every printable ASCII char (tokenizer.py)
  2. vae        — AutoencoderKL 64x64x3 -> 16x16x4, then frozen (autoencoder.py)
  3. latents    — the training scenes (rendered on every core) encoded once and cached; the decoder is then
                  sharpened with the encoder frozen, so the cached latents stay valid (autoencoder.py)
  4. unet       — UNet2DConditionModel + CLIPTextModel trained jointly from scratch: epsilon prediction,
                  min-SNR-5 loss weighting, AdamW with warmup + cosine decay, 10% empty captions (for CFG),
                  plus the grounding loss (grounding.py) that makes each object's words outline its pixels in
                  cross-attention, which is what lets layout guidance steer the model; EMA weights; checkpoints
                  (engines/checkpoint.py) every --ckpt-every steps, exports (EMA, fp16 safetensors) to --out every
                  --export-every steps, so there is always a usable model.
The model definitions are in models.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.checkpoint import Checkpoint, TrainingState
from engines.models import resolve_device
from kernels.attention_record import AttentionRecord, RecordingAttnProcessor

from .autoencoder import cache_latents, finetune_decoder, reconstruction_loss, train_vae, vae_dir
from .grounding import grounding_loss, grounding_targets
from .models import SCHEDULER_KW, export_pipeline, make_text_encoder, make_unet, make_vae, n_params
from .optim import SEED, cosine_lr, ema_update, log, optimizer_step
from .scenes import random_scene
from .tokenizer import load_tokenizer, write_tokenizer
from .training_data import TrainingSet, load_grounding_targets

WARMUP_STEPS = 500
RECIPE_ARGS = (
    "vae_steps",
    "vae_batch",
    "decoder_steps",
    "scenes",
    "steps",
    "batch",
    "lr",
    "ground_weight",
    "ground_after",
)


@dataclass(frozen=True)
class UnetRecipe:
    steps: int
    batch: int
    lr: float  # peak learning rate of the warmup + cosine plan
    ground_weight: float = 0.0  # weight of the grounding loss (0: off)
    ground_after: int = 0  # first step that uses it


@dataclass(frozen=True)
class Cadence:
    minutes: float  # wall-clock budget of this run (0: none); run again to resume
    log_every: int
    ckpt_every: int
    export_every: int


@dataclass(frozen=True)
class UnetModels:
    """The UNet and text encoder trained jointly, their EMA copies (what ships) and the optimizer."""

    tokenizer: object
    unet: torch.nn.Module
    te: torch.nn.Module
    ema_unet: torch.nn.Module
    ema_te: torch.nn.Module
    opt: torch.optim.Optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.te.parameters())

    @property
    def ema_params(self) -> list[torch.nn.Parameter]:
        return list(self.ema_unet.parameters()) + list(self.ema_te.parameters())

    def state(self) -> TrainingState:
        modules = {"unet": self.unet, "te": self.te, "ema_unet": self.ema_unet, "ema_te": self.ema_te}
        return TrainingState(modules, self.opt)


def build_models(work: Path, lr: float, device: torch.device, fused: bool) -> UnetModels:
    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(work / "tokenizer")
    unet, te = make_unet().to(device).train(), make_text_encoder(tokenizer).to(device).train()
    ema_unet, ema_te = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    return UnetModels(tokenizer, unet, te, ema_unet, ema_te, opt)


def unet_checkpoint(work: Path) -> Checkpoint:
    """work/ckpt/, keyed by the recipe the work folder records, so no other recipe's state is ever resumed."""
    if (work / "ckpt.safetensors").exists():
        raise SystemExit(
            f"{work / 'ckpt.safetensors'} is a checkpoint in the format used before "
            f"engines/checkpoint.py, which this trainer does not read. Delete it to restart the UNet "
            f"stage from step 0, or finish that run with the trainer it was started with."
        )
    recipe = work / "recipe.json"
    key = hashlib.sha256(recipe.read_bytes()).hexdigest() if recipe.exists() else "no recipe recorded"
    return Checkpoint(work / "ckpt", key)


@dataclass(frozen=True)
class NoiseSchedule:
    abar: torch.Tensor  # [1000] cumulative product of the alphas
    weight: torch.Tensor  # [1000] min-SNR-5 loss weight for epsilon prediction

    @classmethod
    def on(cls, device: torch.device) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k != "set_alpha_to_one"})
        abar = sched.alphas_cumprod.float().to(device)  # [1000]
        snr = abar / (1 - abar)
        return cls(abar, torch.clamp(snr, max=5.0) / snr)


def unet_loss(
    models: UnetModels,
    data: TrainingSet,
    schedule: NoiseSchedule,
    record: AttentionRecord | None,
    recipe: UnetRecipe,
    step: int,
    g: torch.Generator,
    g_noise: torch.Generator,
):
    """(loss, plain denoising loss, grounding loss or None) of one batch; the draws keep their order for resumes."""
    device = data.latents.device
    idx = torch.randint(len(data), (recipe.batch,), generator=g).to(device)
    drop = (torch.rand(recipe.batch, generator=g) < 0.1).to(device)  # empty captions, for classifier-free guidance
    t = torch.randint(0, 1000, (recipe.batch,), generator=g).to(device)
    x0 = data.latents[idx]  # [B, 4, 16, 16]
    ids = torch.where(drop.view(-1, 1), data.empty_ids, data.ids[idx])  # [B, 77]
    noise = torch.randn(x0.shape, generator=g_noise, device=device)  # [B, 4, 16, 16]
    abar = schedule.abar[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with (record or AttentionRecord()).capture() as recorded:
        pred = models.unet(xt, t, encoder_hidden_states=models.te(ids)[0]).sample  # [B, 4, 16, 16]
    loss_per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # [B]
    loss = (loss_per * schedule.weight[t]).mean()
    ground = None
    if record is not None and step >= recipe.ground_after:
        positions = data.targets.positions[idx].masked_fill(drop.view(-1, 1, 1), -1)  # no words, no target
        ground = grounding_loss([maps for maps, _ in recorded], positions, data.targets.masks[idx])
        loss = loss + recipe.ground_weight * ground
    return loss, loss_per.mean().detach(), ground


def write_stats(work: Path, step: int, recipe: UnetRecipe, losses: list[torch.Tensor], sec_per_step: float) -> None:
    loss = torch.stack(losses).mean().item() if losses else float("nan")
    (work / "train_stats.json").write_text(
        json.dumps(
            dict(
                step=step,
                batch=recipe.batch,
                lr=recipe.lr,
                steps=recipe.steps,
                loss_last100=loss,
                sec_per_step=sec_per_step,
            )
        )
    )


def train_unet(
    work: Path, out: Path, latents_path: Path, recipe: UnetRecipe, cadence: Cadence, device: torch.device
) -> None:
    models = build_models(work, recipe.lr, device, fused=device.type == "cuda")
    log(
        f"unet {n_params(models.unet) / 1e6:.2f} M params, text encoder {n_params(models.te) / 1e6:.2f} M params, "
        f"on {device}"
    )
    checkpoint = unet_checkpoint(work)
    restored = checkpoint.load(models.state())
    step = restored.step if restored else 0
    if restored:
        log(f"resumed from {checkpoint.folder} at step {step}")
    data = TrainingSet(work, latents_path, models.tokenizer, device, grounding=recipe.ground_weight > 0)
    log(f"{len(data)} cached scenes, latent std {data.latents.std():.3f}")
    record = None
    if recipe.ground_weight > 0:
        record = AttentionRecord()
        models.unet.set_attn_processor(RecordingAttnProcessor(record))
        log(f"grounding loss weight {recipe.ground_weight} from step {recipe.ground_after}")
    schedule = NoiseSchedule.on(device)
    g = torch.Generator().manual_seed(SEED + step)  # batches; a resume continues a (different but fixed) stream
    g_noise = torch.Generator(device).manual_seed(SEED + step)
    first_step, t_start, losses, ground_losses = step, time.time(), [], []  # losses stay on the device: no sync
    last_export = time.time()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(now=True))  # finish the step, save, exit

    def export_and_record() -> None:
        export_pipeline(out, vae_dir(work), models.ema_unet, models.ema_te, models.tokenizer)
        write_stats(work, step, recipe, losses, (time.time() - t_start) / max(1, step - first_step))

    while step < recipe.steps:
        if cadence.minutes and time.time() - t_start > cadence.minutes * 60:
            log(f"time budget of {cadence.minutes} min reached at step {step}")
            break
        if stop["now"]:
            log(f"SIGTERM: stopping at step {step}")
            break
        loss, plain, ground = unet_loss(models, data, schedule, record, recipe, step, g, g_noise)
        if ground is not None:
            ground_losses = (ground_losses + [ground.detach()])[-100:]
        lr = cosine_lr(recipe.lr, step, recipe.steps, WARMUP_STEPS, 0.1)
        optimizer_step(models.opt, loss, models.params, lr)
        step += 1
        ema_update(models.ema_params, models.params, step)
        losses = (losses + [plain])[-100:]
        if step % cadence.log_every == 0:
            grounding = f" grounding {torch.stack(ground_losses).mean():.4f}" if ground_losses else ""
            log(
                f"step {step}/{recipe.steps} loss {torch.stack(losses[-cadence.log_every :]).mean():.4f}{grounding} "
                f"lr {lr:.2e} {(time.time() - t_start) / (step - first_step):.3f}s/step"
            )
        if step % cadence.ckpt_every == 0 or step == recipe.steps:
            checkpoint.save(models.state(), step)
        if step % cadence.export_every == 0 or step == recipe.steps or time.time() - last_export > 600:
            last_export = time.time()
            export_and_record()
            log(f"exported EMA weights to {out} at step {step}")
    checkpoint.save(models.state(), step)
    export_and_record()
    log(f"done at step {step}; exported to {out}")


def export_only(work: Path, out: Path) -> None:
    """Re-export the EMA weights of the last checkpoint (e.g. after the decoder stage finished)."""
    models = build_models(work, 1e-3, torch.device("cpu"), fused=False)
    restored = unet_checkpoint(work).load(models.state())
    if restored is None:
        raise SystemExit(f"no checkpoint of this work folder's recipe in {work / 'ckpt'}: nothing to export")
    export_pipeline(out, vae_dir(work), models.ema_unet, models.ema_te, models.tokenizer)
    log(f"exported step {restored.step} (EMA) with {vae_dir(work)} to {out}")


def bench(work: Path, batch: int, device: torch.device, n: int = 20) -> None:
    """Seconds per UNet + text encoder training step (grounding loss included) and per VAE step, on `device`."""
    tok = load_tokenizer(work / "tokenizer")
    unet, te, vae = make_unet().to(device), make_text_encoder(tok).to(device), make_vae().to(device)
    log(f"params: unet {n_params(unet) / 1e6:.2f} M, te {n_params(te) / 1e6:.2f} M, vae {n_params(vae) / 1e6:.2f} M")
    record = AttentionRecord()
    unet.set_attn_processor(RecordingAttnProcessor(record))
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    targets = grounding_targets([random_scene(s) for s in range(batch)], tok)
    positions, masks = targets.positions.to(device), targets.masks.to(device)
    ids = tok(
        [random_scene(s).caption for s in range(batch)], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids.to(device)

    def unet_step() -> None:
        x = torch.randn(batch, 4, 16, 16, device=device)
        with record.capture() as recorded:
            pred = unet(x, torch.randint(0, 1000, (batch,), device=device), encoder_hidden_states=te(ids)[0]).sample
        ground = grounding_loss([maps for maps, _ in recorded], positions, masks)
        optimizer_step(opt, pred.pow(2).mean() + 0.05 * ground, params, 1e-4)

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
        raise SystemExit(
            f"{work} holds the state of another recipe ({'; '.join(changed)}). "
            f"Pass another --work, or delete {work} to start over."
        )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/demo_model")
    ap.add_argument("--work", default=".cache/demo_train")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="wall-clock budget of this run's UNet stage (0 = none); run again to resume",
    )
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
    ap.add_argument(
        "--ground-weight",
        type=float,
        default=0.05,
        help="weight of the grounding loss that ties object words to object pixels (0 = off)",
    )
    ap.add_argument("--ground-after", type=int, default=0, help="first step that uses the grounding loss")
    ap.add_argument("--prepare-only", action="store_true", help="stop after the VAE, latent and decoder stages")
    ap.add_argument("--bench", action="store_true", help="only measure seconds per step")
    ap.add_argument("--export-only", action="store_true", help="only re-export the last checkpoint's EMA weights")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
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
    train_unet(
        work,
        out,
        latents_path,
        UnetRecipe(a.steps, a.batch, a.lr, a.ground_weight, a.ground_after),
        Cadence(a.minutes, a.log_every, a.ckpt_every, a.export_every),
        device,
    )


if __name__ == "__main__":
    main()
