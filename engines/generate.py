"""Generator: GenerateRequest → GenerateResult on an unmodified diffusers pipeline.

Customisation goes through the three doors DESIGN.md allows: `prompt_embeds` (subject residuals, Cones 2 Eq. 6),
attention processors (layout guidance, kernels/region_attention.py) and the step callback (progress, preview,
cancellation). With no regions and no subjects the pipeline runs exactly as diffusers would, bit for bit.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import diffusers
import numpy as np
import torch
from PIL import Image

from engines import metadata
from engines.box_fitting import BoxFitter
from engines.layout import build_maps, guidance_scale_at
from engines.models import ModelBundle
from engines.prompts import ParsedPrompt, parse_prompt
from engines.types import (
    SCHEDULERS,
    Cancelled,
    GenerateRequest,
    GenerateResult,
    InputError,
    ProgressCallback,
    StepProgress,
)
from kernels.region_attention import GuidanceState, install

# Latent → RGB linear approximations for previews (notes/performance-anchors.md §7, ComfyUI latent_formats),
# rows = latent channels, columns = R, G, B, applied to the scaled latent.
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


@dataclass(frozen=True)
class PreparedPrompt:
    parsed: ParsedPrompt
    embeds: dict[str, torch.Tensor]  # the keyword arguments the pipeline takes instead of `prompt`


class Generator:
    """Owns nothing but a loaded model; one request at a time (the service holds the lock)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def __call__(
        self,
        request: GenerateRequest,
        class_words: Mapping[str, str] | None = None,
        residuals: Callable[[str], dict[str, torch.Tensor]] | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult:
        started = time.perf_counter()
        # 1. Check inputs and fix the seeds (one per image, reported).
        width, height = self.image_size(request)
        seeds = self.seeds(request)
        # 2. Encode the prompt; add each subject's residual at its class-word tokens (Cones 2 Eq. 6).
        prepared = self.prepare_prompt(request, class_words or {}, residuals)
        encoded = time.perf_counter()
        # 3. Denoise with layout guidance installed on the UNet; everything is restored afterwards.
        with (
            self._scheduler(request.scheduler),
            self._layout_guidance(request, prepared.parsed, width, height) as state,
        ):
            fitter = self._box_fitter(request, prepared.parsed, state)
            images = self.bundle.pipe(
                **prepared.embeds,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg,
                width=width,
                height=height,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=self._step_callback(request, fitter, on_progress, cancel, started),
                callback_on_step_end_tensor_inputs=self._callback_tensors(fitter),
                output_type="pil",
            ).images
        denoised = time.perf_counter()
        # 4. Every image carries the request that makes it again.
        infos = [metadata.png_info(replace(request, seed=seed, num_images=1), self.bundle) for seed in seeds]
        for image, info in zip(images, infos):
            image.info.update(info)
        timings = {"encode": encoded - started, "denoise": denoised - encoded, "total": time.perf_counter() - started}
        return GenerateResult(tuple(images), tuple(seeds), request, tuple(infos), timings)

    def image_size(self, request: GenerateRequest) -> tuple[int, int]:
        native = self.bundle.native_size
        width, height = request.width or native, request.height or native
        multiple = self.bundle.pipe.vae_scale_factor * 2 ** (len(self.bundle.pipe.unet.config.block_out_channels) - 1)
        if width % multiple or height % multiple:
            raise InputError(f"width and height must be multiples of {multiple} for this model (got {width}×{height})")
        return width, height

    @staticmethod
    def seeds(request: GenerateRequest) -> list[int]:
        base = request.seed if request.seed is not None else random.randrange(2**31)
        return [base + k for k in range(request.num_images)]

    def prepare_prompt(
        self,
        request: GenerateRequest,
        class_words: Mapping[str, str],
        residuals: Callable[[str], dict[str, torch.Tensor]] | None,
    ) -> PreparedPrompt:
        parsed = parse_prompt(request.prompt, request.layout, class_words, self.bundle.tokenizers)
        pipe, device = self.bundle.pipe, self.bundle.device
        do_cfg = request.cfg > 1
        if self.bundle.is_xl:
            positive, negative, pooled, negative_pooled = pipe.encode_prompt(
                parsed.text,
                device=device,
                num_images_per_prompt=request.num_images,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=request.negative_prompt or None,
            )
            embeds = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
        else:
            positive, negative = pipe.encode_prompt(
                parsed.text, device, request.num_images, do_cfg, negative_prompt=request.negative_prompt or None
            )
            embeds = {}
        if parsed.subjects:
            positive = add_residuals(
                positive, parsed, residuals, [e.config.hidden_size for e in self.bundle.text_encoders]
            )
        return PreparedPrompt(parsed, {**embeds, "prompt_embeds": positive, "negative_prompt_embeds": negative})

    @contextmanager
    def _scheduler(self, name: str):
        pipe = self.bundle.pipe
        original = pipe.scheduler
        sampler = SCHEDULERS[name]
        cls = getattr(diffusers, sampler.scheduler) if sampler.scheduler else type(original)
        pipe.scheduler = cls.from_config(original.config, **dict(sampler.options))  # fresh state per request
        try:
            yield
        finally:
            pipe.scheduler = original

    @contextmanager
    def _layout_guidance(self, request: GenerateRequest, parsed: ParsedPrompt, width: int, height: int):
        """Install the region processors and a UNet pre-hook that sets η(t) from each call's timestep."""
        unet = self.bundle.pipe.unet
        guidance = request.guidance
        if not request.layout.regions or (guidance.strength == 0 and guidance.fit_iterations == 0):
            yield None
            return
        factor = self.bundle.pipe.vae_scale_factor
        maps = build_maps(
            request.layout,
            parsed.region_positions,
            self.bundle.tokenizers[0].model_max_length,
            (height // factor, width // factor),
            len(unet.config.block_out_channels),
            request.guidance,
        )
        state = GuidanceState(maps, images=request.num_images)
        alphas = self.bundle.pipe.scheduler.alphas_cumprod.cpu()

        def set_time(_module, args, kwargs):
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            state.time_scale = guidance_scale_at(request.guidance, alphas, t)

        previous = install(unet, state, request.guidance.bound_self_attention)
        hook = unet.register_forward_pre_hook(set_time, with_kwargs=True)
        try:
            yield state
        finally:
            hook.remove()
            unet.set_attn_processor(previous)

    def _box_fitter(self, request: GenerateRequest, parsed: ParsedPrompt, state: GuidanceState | None):
        if state is None or request.guidance.fit_iterations == 0:
            return None
        return BoxFitter(self.bundle.pipe.unet, state.record, parsed.region_positions, request.guidance)

    def _callback_tensors(self, fitter: BoxFitter | None) -> list[str]:
        """What the step callback needs from the pipeline's loop: the conditioning too when it fits boxes."""
        if fitter is None:
            return ["latents"]
        return ["latents", "prompt_embeds"] + (["add_text_embeds", "add_time_ids"] if self.bundle.is_xl else [])

    def _fit_conditioning(self, pipe, tensors: dict) -> dict:
        """The UNet's keyword arguments for the conditional rows of the pipeline's (CFG-batched) inputs."""

        def conditional(x: torch.Tensor) -> torch.Tensor:
            return x.chunk(2)[1] if pipe.do_classifier_free_guidance else x

        kwargs = {"encoder_hidden_states": conditional(tensors["prompt_embeds"])}
        if self.bundle.is_xl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": conditional(tensors["add_text_embeds"]),
                "time_ids": conditional(tensors["add_time_ids"]),
            }
        return kwargs

    def _step_callback(self, request: GenerateRequest, fitter: BoxFitter | None, on_progress, cancel, started: float):
        # A linear preview costs nothing, and ten per run are plenty; a VAE-decoded one (the demo model) costs
        # about a tenth of a 64x64 run's denoising on a CPU, so it shows four.
        every = max(1, request.steps // (10 if self.bundle.family in PREVIEW_FACTORS else 4))

        def callback(pipe, step: int, timestep, tensors: dict) -> dict:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if on_progress is not None:
                done = step + 1
                show = done % every == 0 or done == request.steps
                preview = self.preview(tensors["latents"]) if show else None
                on_progress(StepProgress(done, request.steps, time.perf_counter() - started, preview))
            upcoming = pipe.scheduler.timesteps[step + 1] if step + 1 < len(pipe.scheduler.timesteps) else None
            if fitter is None or upcoming is None or not fitter.wants(pipe.scheduler, upcoming):
                return {}
            conditioning = self._fit_conditioning(pipe, tensors)
            return {"latents": fitter(pipe.scheduler, tensors["latents"], upcoming, conditioning)}

        return callback

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """The first image's current latent as RGB: a linear map for SD-family VAEs, the (tiny) VAE otherwise."""
        latent = latents[:1].float()  # (1, 4, h, w)
        factors = PREVIEW_FACTORS.get(self.bundle.family)
        if factors is not None:
            weight = torch.tensor(factors[0], device=latent.device)  # (4, 3)
            bias = torch.tensor(factors[1], device=latent.device)
            rgb = torch.einsum("bchw,cr->bhwr", latent, weight) + bias  # (1, h, w, 3)
        else:
            vae = self.bundle.pipe.vae
            with torch.no_grad():
                decoded = vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor).sample.float()  # (1, 3, H, W)
            rgb = decoded.permute(0, 2, 3, 1)
        pixels = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(pixels))


def add_residuals(
    prompt_embeds: torch.Tensor,
    parsed: ParsedPrompt,
    residuals: Callable[[str], dict[str, torch.Tensor]] | None,
    widths: list[int],
) -> torch.Tensor:
    """Cones 2 Eq. 6: c' = c + Δ at the class-word tokens of each subject occurrence. The pipeline concatenates the
    encoders' outputs along features (SDXL: 768 + 1280), so Δ is concatenated in the same order.
    prompt_embeds (B, T, ΣD) → (B, T, ΣD)."""
    if residuals is None:
        raise InputError("this prompt names subjects, but no subject library is available")
    out = prompt_embeds.clone()
    names = ("text_encoder", "text_encoder_2")[: len(widths)]
    for occurrence in parsed.subjects:
        per_encoder = residuals(occurrence.name)
        delta = torch.cat([per_encoder[name] for name in names], dim=-1)  # (n_tokens, ΣD)
        if delta.shape != (len(occurrence.positions), sum(widths)):
            raise InputError(
                f"<{occurrence.name}> was registered with a class word of {delta.shape[0]} token(s) and "
                f"width {delta.shape[-1]}; here it is {len(occurrence.positions)} × {sum(widths)}"
            )
        out[:, list(occurrence.positions)] += delta.to(out.device, out.dtype)
    return out
