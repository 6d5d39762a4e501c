"""The frozen parts of the pipeline that registration trains through, and the precision it runs them in.

The UNet and the VAE are never changed (the UNet is frozen, but gradients flow through it to the text encoder). On
CUDA everything runs under autocast in the UNet's half dtype (bf16, else fp16 with a GradScaler) while the tuned
encoder keeps fp32 master weights; on the CPU everything stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


def _autocast_dtype(device: torch.device, unet_dtype: torch.dtype) -> torch.dtype | None:
    """CUDA: autocast in the UNet's half dtype (no fp16/bf16 mixing); an fp32 UNet gets bf16 where supported."""
    if device.type != "cuda":
        return None
    if unet_dtype in (torch.float16, torch.bfloat16):
        return unet_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class Backbone:
    """What registration reads from a loaded model besides its text encoders and tokenizers."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: DDPMScheduler  # the training form of the pipeline's scheduler (same betas, same prediction)
    device: torch.device
    xl: bool
    native_size: int  # the model's training resolution in pixels
    amp: torch.dtype | None  # autocast dtype; None: full precision

    @classmethod
    def of(cls, bundle) -> Backbone:
        """The backbone of a loaded engines.models.ModelBundle."""
        pipe = bundle.pipe
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            device=bundle.device,
            xl=bundle.is_xl,
            native_size=bundle.native_size,
            amp=_autocast_dtype(bundle.device, pipe.unet.dtype),
        )

    @property
    def prediction(self) -> str:
        """'epsilon' or 'v_prediction': what the UNet predicts, hence the target of Eq. 2."""
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def autocast(self):
        if self.amp is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    def needs_gradient_checkpointing(self) -> bool:
        """SDXL backprop through the UNet at 1024 px with a batch of 4 does not fit under ~40 GB without it."""
        if not self.xl or self.device.type != "cuda":
            return False
        return torch.cuda.get_device_properties(self.device).total_memory < 40 * 2**30

    def noisy_latents(
        self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) of Eq. 2 for scaled latents (b, 4, h, w): the target is ε, or v for v-prediction models."""
        noisy = self.noise_scheduler.add_noise(latents, noise, t)  # (b, 4, h, w)
        target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        return noisy, target

    def added_kwargs(self, added: dict[str, torch.Tensor] | None, batch: int) -> dict:
        """The UNet's extra keyword arguments: SDXL's pooled embedding and size ids for a batch, nothing otherwise."""
        if added is None:
            return {}
        return {"added_cond_kwargs": {k: v.expand(batch, -1).to(self.unet.dtype) for k, v in added.items()}}
