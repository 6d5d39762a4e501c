"""What every stage of the demo trainer shares: the seed, the log line, the learning-rate plan, one AdamW step, EMA."""

from __future__ import annotations

import math
import time

import torch

SEED = 1234


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (every stage trains this way)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def cosine_lr(lr: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warmup, then cosine decay from lr to floor * lr: a function of the step alone, so a resume continues
    on the same plan."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int) -> None:
    """Exponential moving average of the weights, with a decay that ramps up to 0.999 over the first steps."""
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)
