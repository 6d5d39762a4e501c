"""The registration loop: tune E^custom with L = L_sub + λ·L_reg, then measure Δ (papers/cones2.txt Eq. 2–5).

    L_sub = E_{x,ε,t} w·‖ε_θ(x_t, c, t) − target‖²                         (Eq. 2; target ε or v, w the photo's mask)
    L_reg = E_{c∈C_class} mean_{p∈c, p≠class} ‖E^custom(c)_p − E(c)_p‖²  (Eq. 3)
    L     = L_sub + λ·L_reg                                              (Eq. 4)
    Δ     = mean_{c∈C_class} (E^custom(c)_class − E(c)_class)            (Eq. 5)

The tuned encoder is an fp32 copy (the bundle's encoders are never touched) and is thrown away after Eq. 5. Every
random draw comes from one generator seeded by the request, in a fixed order per step, and the learning rate is a
function of the step alone, so a run resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from engines.checkpoint import Checkpoint, TrainingState
from engines.faults import fault_point
from engines.images import PreparedPhoto
from engines.models import float_text_encoders, is_quantized
from engines.register.backbone import Backbone
from engines.register.condition import class_rows, unet_condition
from engines.register.data import TrainingData, encode_training_data
from engines.types import Cancelled, InputError, ProgressCallback, RegisterPreset, RegisterRequest, StepProgress

ENCODER_KEYS = ("text_encoder", "text_encoder_2")  # how the library names each encoder's Δ


@dataclass(frozen=True)
class Trainee:
    """E^custom: the fp32 encoder copies being tuned, their optimizer, and the generator of every random draw."""

    encoders: tuple[torch.nn.Module, ...]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 autocast only
    generator: torch.Generator

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for e in self.encoders for p in e.parameters()]

    def state(self) -> TrainingState:
        """What a checkpoint saves and restores: weights, optimizer moments, RNG and the GradScaler."""
        return TrainingState(
            {f"enc{i}": e for i, e in enumerate(self.encoders)}, self.optimizer, {"draws": self.generator}, self.scaler
        )


@dataclass(frozen=True)
class Trained:
    deltas: dict[str, torch.Tensor]  # per encoder key (n_cls, width) fp32 on the CPU
    curve: tuple[float, ...]  # L per step, resumed steps included
    stats: dict


@dataclass(frozen=True)
class _Curves:
    total: list[float]  # L per step since step 0 (restored from a checkpoint when resumed)
    sub: list[float]  # L_sub of this call's steps
    reg: list[float]  # L_reg of this call's steps
    clock: float  # time.perf_counter() value at which this registration would have begun without interruptions


def _trainable_copy(encoder: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An fp32 copy of a text encoder, detached from any offload hooks of the pipeline."""
    if is_quantized(encoder):  # float_text_encoders gives float ones; this says so if that ever changes
        raise InputError("registering a subject trains a copy of the text encoder, which cannot be quantized")
    tuned = copy.deepcopy(encoder)
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(tuned, recurse=True)
    except ImportError:
        pass
    return tuned.to(device, torch.float32).eval().requires_grad_(False)


def _make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay 0: decay pulls weights toward zero, not toward the frozen encoder, so it only adds drift.
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        except ImportError:
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _trainee(
    backbone: Backbone, encoders: tuple[torch.nn.Module, ...], preset: RegisterPreset, seed: int, checkpointing: bool
) -> Trainee:
    for e in encoders:
        e.train().requires_grad_(True)
        if checkpointing:
            enable = getattr(e, "activation_checkpointing_enable", None) or e.gradient_checkpointing_enable
            enable()
    optimizer = _make_optimizer([p for e in encoders for p in e.parameters()], preset.lr, backbone.device)
    scaler = torch.amp.GradScaler("cuda") if backbone.amp == torch.float16 else None
    return Trainee(encoders, optimizer, scaler, torch.Generator(backbone.device).manual_seed(seed))


@contextmanager
def _frozen_unet(unet: torch.nn.Module, checkpointing: bool):
    """The UNet in eval mode with no gradients of its own (they still flow through it), restored as it was after."""
    grad_flags = [p.requires_grad for p in unet.parameters()]
    was_training = unet.training
    was_checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    unet.eval().requires_grad_(False)
    if checkpointing and not was_checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for p, flag in zip(unet.parameters(), grad_flags):
            p.requires_grad_(flag)
        unet.train(was_training)
        if checkpointing and not was_checkpointing:
            unet.disable_gradient_checkpointing()


def weighted_denoising_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for (b, 4, h, w) predictions: the squared error weighted by w (b, 1, h, w), per weighted element."""
    return ((pred.float() - target.float()) ** 2 * w).sum() / (w.sum() * pred.shape[1])


@dataclass(frozen=True)
class _Draw:
    """One step's random draws."""

    pick: torch.Tensor  # (b,) photo latents
    latents: torch.Tensor  # (b, 4, h, w) scaled samples of the picked photos' latent distributions
    noise: torch.Tensor  # (b, 4, h, w)
    t: torch.Tensor  # (b,) timesteps
    rows: torch.Tensor  # (R,) L_reg sentences of the pool


def _draw(backbone: Backbone, preset: RegisterPreset, data: TrainingData, generator: torch.Generator) -> _Draw:
    """The draws in their fixed order (photos, latent samples, noise, timesteps, sentences): a resume depends on it."""
    device, mean, std = backbone.device, data.photos.mean, data.photos.std
    pick = torch.randint(0, mean.shape[0], (preset.batch,), generator=generator, device=device)  # (b,)
    latents = mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator, device=device)
    latents = latents * backbone.latent_scale  # (b, 4, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device)  # (b, 4, h, w)
    t = torch.randint(
        0, backbone.noise_scheduler.config.num_train_timesteps, (preset.batch,), generator=generator, device=device
    )  # (b,)
    rows = torch.randint(0, len(data.pool), (preset.reg_batch,), generator=generator, device=device)  # (R,)
    return _Draw(pick, latents, noise, t, rows)


def training_step(
    backbone: Backbone, preset: RegisterPreset, data: TrainingData, trainee: Trainee
) -> tuple[float, float]:
    """One optimizer step on Eq. 4; returns (L_sub, L_reg)."""
    draw = _draw(backbone, preset, data, trainee.generator)
    noisy, target = backbone.noisy_latents(draw.latents, draw.noise, draw.t)  # (b, 4, h, w) each
    unet, prompt, pool = backbone.unet, data.prompt, data.pool
    with backbone.autocast():
        # one encoder pass for the training prompt and the L_reg sentences together
        rows = draw.rows.cpu()
        ids = [torch.cat([p, x[rows].to(backbone.device)]) for p, x in zip(prompt.ids, pool.ids)]  # (1 + R, L)
        encoded = unet_condition(trainee.encoders, ids, backbone.xl)  # (1 + R, L, D)
        cond = prompt.condition(encoded[:1]).expand(preset.batch, -1, -1).to(unet.dtype)  # (b, L, D)
        pred = unet(
            noisy.to(unet.dtype),
            draw.t,
            encoder_hidden_states=cond,
            **backbone.added_kwargs(prompt.added, preset.batch),
        ).sample  # (b, 4, h, w)
        l_sub = weighted_denoising_loss(pred, target, data.photos.weights[draw.pick])  # Eq. 2
        per_token = ((encoded[1:].float() - pool.targets[draw.rows]) ** 2).mean(-1)  # (R, L)
        pinned = pool.keep[draw.rows].float()  # (R, L): every position but the class word (Eq. 3)
        l_reg = (per_token * pinned).sum() / pinned.sum()
        loss = l_sub + preset.reg_weight * l_reg  # Eq. 4
    optimizer, scaler = trainee.optimizer, trainee.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
        optimizer.step()
    return float(l_sub.detach()), float(l_reg.detach())


@torch.no_grad()
def photo_loss(backbone: Backbone, data: TrainingData, encoders) -> float:
    """L_sub on a fixed set (≤ 4 latent means × 4 timesteps, fixed noise): comparable before and after, and cheap
    (two UNet batches of 8) so that it can run on every registration."""
    unet, device, photos = backbone.unet, backbone.device, data.photos
    generator = torch.Generator(device).manual_seed(12345)
    total_t = backbone.noise_scheduler.config.num_train_timesteps
    k = min(photos.mean.shape[0], 4)
    latents = (photos.mean[:k] * backbone.latent_scale).repeat(4, 1, 1, 1)  # (4k, 4, h, w)
    w_all = photos.weights[:k].repeat(4, 1, 1, 1)  # (4k, 1, h, w)
    t_all = torch.tensor([int(total_t * f) for f in (0.2, 0.4, 0.6, 0.8)], device=device)
    t_all = t_all.repeat_interleave(k)  # (4k,)
    noise_all = torch.randn(latents.shape, generator=generator, device=device)  # (4k, 4, h, w)
    losses = []
    with backbone.autocast():
        cond1 = data.prompt.condition(unet_condition(encoders, data.prompt.ids, backbone.xl)).to(unet.dtype)  # (1,L,D)
        for i in range(0, latents.shape[0], 8):
            noisy, target = backbone.noisy_latents(latents[i : i + 8], noise_all[i : i + 8], t_all[i : i + 8])
            b = noisy.shape[0]
            pred = unet(
                noisy.to(unet.dtype),
                t_all[i : i + 8],
                encoder_hidden_states=cond1.expand(b, -1, -1),
                **backbone.added_kwargs(data.prompt.added, b),
            ).sample  # (b, 4, h, w)
            losses.append(float(weighted_denoising_loss(pred, target, w_all[i : i + 8])) * b)
    return sum(losses) / latents.shape[0]


def _run_steps(
    backbone: Backbone,
    preset: RegisterPreset,
    data: TrainingData,
    trainee: Trainee,
    checkpoint: Checkpoint,
    name: str,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> _Curves:
    """Steps from the checkpoint's (or 0) to the preset's; a cancel saves a checkpoint and raises Cancelled."""
    restored = checkpoint.load(trainee.state())
    start = restored.step if restored else 0
    total = [float(v) for v in restored.extra["curve"]] if restored else []
    clock = time.perf_counter() - (float(restored.extra["elapsed"]) if restored else 0.0)
    sub_curve, reg_curve = [], []
    warmup_steps = max(1, round(preset.warmup * preset.steps))
    for step in range(start, preset.steps):
        for group in trainee.optimizer.param_groups:  # a function of the step alone: resumes exactly
            group["lr"] = preset.lr * min(1.0, (step + 1) / warmup_steps)
        if cancel is not None and cancel.is_set():
            checkpoint.save(trainee.state(), step, {"curve": total, "elapsed": time.perf_counter() - clock})
            raise Cancelled(f"registration of '{name}' cancelled at step {step}/{preset.steps}")
        l_sub, l_reg = training_step(backbone, preset, data, trainee)
        loss = l_sub + preset.reg_weight * l_reg
        total.append(loss)
        sub_curve.append(l_sub)
        reg_curve.append(l_reg)
        elapsed = time.perf_counter() - clock
        if on_progress is not None:
            on_progress(StepProgress(step=step + 1, total=preset.steps, elapsed=elapsed, loss=loss))
        done = step + 1
        if preset.checkpoint_every and done % preset.checkpoint_every == 0 and done < preset.steps:
            checkpoint.save(trainee.state(), done, {"curve": total, "elapsed": elapsed})
        fault_point("register.step")
    return _Curves(total, sub_curve, reg_curve, clock)


def _mean_of_last(values: list[float], n: int = 10) -> float | None:
    return float(np.mean(values[-n:])) if values else None


@torch.no_grad()
def _measure(backbone: Backbone, data: TrainingData, encoders) -> tuple[dict[str, torch.Tensor], float]:
    """Eq. 5's Δ per encoder, and the relative drift of non-class outputs on held-out sentences (Eq. 3's aim)."""
    evaluation = data.evaluation
    tuned_rows = class_rows(encoders, evaluation.delta_bank, data.n_class, backbone.device, backbone.xl)
    heldout = unet_condition(encoders, evaluation.heldout_ids, backbone.xl).float()  # (H, L, D)
    keep = evaluation.heldout_keep  # (H, L)
    drift = (heldout - evaluation.heldout_frozen).norm(dim=-1)[keep]  # (K,) non-class tokens only
    preservation = float(drift.mean() / evaluation.heldout_frozen.norm(dim=-1)[keep].mean())
    deltas = {
        ENCODER_KEYS[i]: (t - f).mean(0).float().cpu()
        for i, (t, f) in enumerate(zip(tuned_rows, evaluation.frozen_rows))
    }  # (n_cls, width) each
    return deltas, preservation


def train_subject(
    bundle,
    request: RegisterRequest,
    preset: RegisterPreset,
    prepared: list[PreparedPhoto],
    checkpoint: Checkpoint,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Trained:
    """Tune a copy of the bundle's text encoder(s) on the photos and return Δ, the loss curve and the run's stats."""
    backbone = Backbone.of(bundle)
    class_word = " ".join(request.class_word.split())
    # a quantized model's encoders were quantized for generation only: E^custom and the frozen E of Eq. 3 are the
    # float originals (engines/models.py loads them again), so Δ measures the same difference as on a float model
    encoders = tuple(_trainable_copy(e, backbone.device) for e in float_text_encoders(bundle))
    data = encode_training_data(backbone, bundle.tokenizers, encoders, class_word, preset, prepared, request.use_masks)
    eval_before = photo_loss(backbone, data, encoders)
    checkpointing = preset.gradient_checkpointing or backbone.needs_gradient_checkpointing()
    trainee = _trainee(backbone, encoders, preset, request.seed, checkpointing)
    with _frozen_unet(backbone.unet, checkpointing):
        curves = _run_steps(backbone, preset, data, trainee, checkpoint, request.name, on_progress, cancel)
    for e in encoders:
        e.eval().requires_grad_(False)
    deltas, preservation = _measure(backbone, data, encoders)
    eval_after = photo_loss(backbone, data, encoders)
    stats = {
        "preset": request.preset,
        "lr": preset.lr,
        "reg_weight": preset.reg_weight,
        "batch": preset.batch,
        "seconds": round(time.perf_counter() - curves.clock, 3),
        "delta_sentences": len(data.evaluation.delta_bank.sentences),
        "photos": len(prepared),
        "use_masks": request.use_masks,
        "gradient_checkpointing": checkpointing,
        "prediction_type": backbone.prediction,
        "seed": request.seed,
        "final_l_sub": _mean_of_last(curves.sub),
        "final_l_reg": _mean_of_last(curves.reg),
        "l_sub_eval_before": eval_before,
        "l_sub_eval_after": eval_after,
        "heldout_preservation_error": preservation,
        "heldout_sentences": data.evaluation.heldout_frozen.shape[0],
        "delta_norms": [round(float(d.norm()), 6) for d in deltas.values()],
    }
    return Trained(deltas, tuple(curves.total), stats)
