"""Normalized text and image guidance (SynCD Eq. 4), through two hooks on the UNet.

With image guidance the target is predicted three times per step, batched into one UNet call:

    ε_∅ = ε(x_t, negative text, no photos)      ε_I = ε(x_t, negative text, photos)      ε_T = ε(x_t, text, photos)
    Δ_I = ε_I − ε_∅,   Δ_T = ε_T − ε_I,   m = min(‖Δ_I‖, ‖Δ_T‖)   (per image)
    ε = ε_I + λ_I(t) · Δ_I · min(1, m / ‖Δ_I‖) + λ_T · Δ_T · min(1, m / ‖Δ_T‖)                          (Eq. 4)

Scaling both guidance vectors down to the smaller norm lets λ_I and λ_T set their balance without the image term,
usually the larger, over-exposing the picture. λ_T is the request's CFG scale; λ_I(t) follows SynCD's schedule.

The pipeline batches CFG as [negative, positive] and combines ε_u + λ_T(ε_c − ε_u). The pre-hook turns that batch
into [negative, negative, positive] (the reference processors give photos to the last two thirds); the forward hook
returns [ε, ε], so the pipeline's own combination gives ε back unchanged. A call that is not CFG-batched (box
fitting's) passes through.
"""

from __future__ import annotations

import torch

from engines.types import ReferenceConfig


def normalized_guidance(unconditional: torch.Tensor, image: torch.Tensor, text: torch.Tensor, text_scale: float,
                        image_scale: float) -> torch.Tensor:  # fmt: skip
    """SynCD Eq. 4 on (B, C, h, w) predictions: ε_∅, ε_I, ε_T → the guided prediction (B, C, h, w)."""
    to_image = image - unconditional  # Δ_I
    to_text = text - image  # Δ_T
    dims = tuple(range(1, unconditional.dim()))
    norm_image = torch.linalg.vector_norm(to_image.float(), dim=dims, keepdim=True).clamp(min=1e-12)  # (B, 1, 1, 1)
    norm_text = torch.linalg.vector_norm(to_text.float(), dim=dims, keepdim=True).clamp(min=1e-12)
    smaller = torch.minimum(norm_image, norm_text)
    to_image = to_image * (smaller / norm_image).clamp(max=1).to(to_image.dtype)
    to_text = to_text * (smaller / norm_text).clamp(max=1).to(to_text.dtype)
    return image + image_scale * to_image + text_scale * to_text


class ImageGuidance:
    """Installs the two hooks for one request; `reference_state.rows` is set so that photos reach the last 2B rows."""

    def __init__(self, unet, config: ReferenceConfig, text_scale: float, images: int, reference_state) -> None:
        self.unet, self.config, self.text_scale, self.images = unet, config, text_scale, images
        self.reference_state = reference_state
        self.train_steps = 1000
        self.timestep: float | None = None
        self.expanded = False  # the call in flight was expanded to three branches
        self.handles: list = []

    def __enter__(self) -> ImageGuidance:
        self.handles = [self.unet.register_forward_pre_hook(self._expand, with_kwargs=True),
                        self.unet.register_forward_hook(self._combine, with_kwargs=True)]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _cfg_batched(self, args, kwargs) -> bool:
        sample = args[0] if args else kwargs["sample"]
        return sample.shape[0] == 2 * self.images and self.reference_state.mode == "read"

    def _expand(self, _module, args, kwargs):
        """[negative, positive] → [negative, negative, positive] in every batched input."""
        if not self._cfg_batched(args, kwargs):
            return None
        args, kwargs = list(args), dict(kwargs)
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if args:
            args[0] = _three_way(args[0])
        else:
            kwargs["sample"] = _three_way(kwargs["sample"])
        kwargs["encoder_hidden_states"] = _three_way(kwargs["encoder_hidden_states"])
        if kwargs.get("added_cond_kwargs"):
            kwargs["added_cond_kwargs"] = {k: _three_way(v) for k, v in kwargs["added_cond_kwargs"].items()}
        self.reference_state.rows, self.expanded = 2 * self.images, True
        return tuple(args), kwargs

    def _combine(self, _module, args, kwargs, output):
        if not self.expanded or self.reference_state.mode != "read":  # not ours: the reference pass, say
            return None
        self.reference_state.rows, self.expanded = self.images, False
        sample = output[0] if isinstance(output, tuple) else output.sample
        unconditional, image, text = sample.chunk(3)
        image_scale = self.config.image_scale(self.timestep, self.train_steps)
        guided = normalized_guidance(unconditional, image, text, self.text_scale, image_scale)
        both = torch.cat([guided, guided])  # the pipeline's CFG of two equal halves is the guided prediction
        return (both,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=both)


def _three_way(batch: torch.Tensor) -> torch.Tensor:
    negative, positive = batch.chunk(2)
    return torch.cat([negative, negative, positive])
