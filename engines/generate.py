"""Generator: GenerateRequest → GenerateResult on an unmodified diffusers pipeline.

Customisation goes through the doors DESIGN.md allows: `prompt_embeds` (subject residuals, Cones 2 Eq. 6),
attention processors (layout guidance, kernels/region_attention.py; reference attention, engines/references.py),
hooks on the UNet (η(t), the reference pass, SynCD's image guidance) and the step callback (progress, preview,
cancellation, box fitting). With no regions and no subjects the pipeline runs exactly as diffusers would, bit for bit.
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import diffusers
import torch

from engines import metadata
from engines.box_fitting import BoxFitter
from engines.cancel_points import block_modules, cancel_points, chunked_self_attention
from engines.collage import compose_collage
from engines.compiled_unet import CompiledForward
from engines.image_guidance import ImageGuidance
from engines.layout import build_maps, guidance_scale_at, whole_self_bound
from engines.models import ModelBundle
from engines.previews import latent_preview, previews_per_run
from engines.prompt_encoding import PreparedPrompt, prepare_prompt
from engines.prompt_subjects import PromptSubjects
from engines.prompts import ParsedPrompt
from engines.references import ReferencePass, encode_references, routing_masks
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


class Generator:
    """Owns nothing but a loaded model; one request at a time (the service holds the lock)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def __call__(
        self,
        request: GenerateRequest,
        subjects: PromptSubjects | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult:
        started = time.perf_counter()
        subjects = subjects or PromptSubjects()
        # 1. Check inputs and fix the seeds (one per image, reported).
        width, height = self.image_size(request)
        seeds = self.seeds(request)
        use_references, warnings = self.uses_references(request, subjects)
        # 2. Encode the prompt; add each subject's residual at its class-word tokens (Cones 2 Eq. 6).
        prepared = self.prepare_prompt(request, subjects)
        encoded = time.perf_counter()
        # 3. Denoise with layout guidance (and references) installed on the UNet; everything is restored afterwards.
        with (
            self._scheduler(request.scheduler),
            self._layout_guidance(request, prepared.parsed, width, height, prepared.num_tokens) as state,
            self._references(request, subjects, use_references, (width, height), seeds[0], state),
            # Stop inside a step too (engines/cancel_points.py); a compiled UNet is asked only before each call
            cancel_points(block_modules(self.bundle.pipe, self.compiled), cancel),
            chunked_self_attention(self.bundle.pipe.unet, None if self.compiled else cancel),
        ):
            fitter = self._box_fitter(request, prepared.parsed, state)
            pipe, start = self._start(request, subjects, width, height)
            images = pipe(
                **prepared.embeds,
                **start,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=self._step_callback(request, fitter, on_progress, cancel, started),
                callback_on_step_end_tensor_inputs=self._callback_tensors(fitter),
                output_type="pil",
            ).images
        denoised = time.perf_counter()
        # 4. Every image carries the request that makes it again, with the references' choice written out.
        made = replace(request, references=replace(request.references, enabled=use_references))
        infos = [metadata.png_info(replace(made, seed=seed, num_images=1), self.bundle) for seed in seeds]
        for image, info in zip(images, infos):
            image.info.update(info)
        timings = {"encode": encoded - started, "denoise": denoised - encoded, "total": time.perf_counter() - started}
        return GenerateResult(tuple(images), tuple(seeds), made, tuple(infos), timings, subjects.warnings + warnings)

    def _start(self, request: GenerateRequest, subjects: PromptSubjects, width: int, height: int) -> tuple:
        """The pipeline and how it starts: from noise, or (MS-CustomNet's layout map, engines/collage.py) from the
        subjects' cut-outs in their boxes, denoised from `start_strength` of the trajectory by the image-to-image
        pipeline built on the same components."""
        if request.references.start == "noise":
            return self.bundle.pipe, {"width": width, "height": height}
        from diffusers import AutoPipelineForImage2Image  # imports every pipeline class (0.7 s): only for a collage

        collage = compose_collage(request.layout, subjects.photos, width, height)
        image_to_image = AutoPipelineForImage2Image.from_pipe(self.bundle.pipe)
        image_to_image.set_progress_bar_config(disable=True)
        return image_to_image, {"image": collage, "strength": request.references.start_strength}

    @staticmethod
    def uses_references(request: GenerateRequest, subjects: PromptSubjects) -> tuple[bool, tuple[str, ...]]:
        """Whether this request reads the subjects' photos, and what the person should hear about it."""
        config = request.references
        if config.enabled is False or config.strength == 0:
            return False, ()
        if config.guides_images and request.cfg <= 1:
            raise InputError("image guidance needs CFG above 1 (it balances the text and the photos against it)")
        if not subjects.photos:
            asked = config.enabled is True and subjects.class_words
            return False, ("references are on, but no subject in the prompt has photos",) if asked else ()
        return True, ()

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

    def prepare_prompt(self, request: GenerateRequest, subjects: PromptSubjects) -> PreparedPrompt:
        return prepare_prompt(self.bundle, request, subjects)  # weighting and long prompts: engines/prompt_encoding.py

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
    def _layout_guidance(self, request: GenerateRequest, parsed: ParsedPrompt, width: int, height: int,
                         num_tokens: int | None = None):  # fmt: skip
        """Install the region processors and a UNet pre-hook that sets η(t) from each call's timestep. `num_tokens` is
        the cross-attention's key length: 77 per window of the longer of prompt and negative prompt."""
        unet = self.bundle.pipe.unet
        guidance = request.guidance
        if not request.layout.regions or (guidance.strength == 0 and guidance.fit_iterations == 0):
            yield None
            return
        factor = self.bundle.pipe.vae_scale_factor
        maps = build_maps(
            request.layout,
            parsed.region_positions,
            num_tokens or parsed.windows * self.bundle.tokenizers[0].model_max_length,
            (height // factor, width // factor),
            len(unet.config.block_out_channels),
            request.guidance,
        )
        state = GuidanceState(maps, images=request.num_images)
        state.prepare(self.bundle.device, self.bundle.dtype)
        alphas = self.bundle.pipe.scheduler.alphas_cumprod.cpu()

        def set_time(_module, args, kwargs):
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            state.set_time_scale(guidance_scale_at(request.guidance, alphas, t))

        previous = install(unet, state, request.guidance.bound_self_attention)
        hook = unet.register_forward_pre_hook(set_time, with_kwargs=True)
        try:
            yield state
        finally:
            hook.remove()
            unet.set_attn_processor(previous)

    @contextmanager
    def _references(self, request, subjects: PromptSubjects, active: bool, size: tuple[int, int], seed: int, state):
        """Reference attention (engines/references.py) and, when asked for, SynCD's image guidance."""
        if not active:
            yield None
            return
        pipe = self.bundle.pipe
        factor, levels = pipe.vae_scale_factor, len(pipe.unet.config.block_out_channels)
        refs = encode_references(self.bundle, subjects.photos)
        side = self.bundle.native_size // factor
        masks = routing_masks(request.layout, refs, (size[1] // factor, size[0] // factor), levels, (side, side))
        passes = ReferencePass(self.bundle, refs, masks, request.references, request.num_images, seed, state)
        if state is not None and request.guidance.bound_self_attention:
            # the rows that see references take one dense (N, N + M) bias, so they need the whole bound at every size
            passes.state.self_blocked = {n: whole_self_bound(m) for n, m in state.maps.items()}
        guided = request.references.guides_images
        images = ImageGuidance(pipe.unet, request.references, request.cfg, request.num_images, passes.state)
        with passes, images if guided else nullcontext():
            yield passes

    @property
    def compiled(self) -> bool:
        return isinstance(self.bundle.pipe.unet.forward, CompiledForward)

    def _box_fitter(self, request: GenerateRequest, parsed: ParsedPrompt, state: GuidanceState | None):
        if state is None or request.guidance.fit_iterations == 0:
            return None
        return BoxFitter(self.bundle.pipe.unet, state, parsed.region_positions, request.guidance)

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
        every = max(1, request.steps // previews_per_run(self.bundle.family))

        def callback(pipe, step: int, timestep, tensors: dict) -> dict:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            every_timestep = pipe.scheduler.timesteps
            timesteps = every_timestep[len(every_timestep) - pipe.num_timesteps :]  # a collage start skips the first
            if on_progress is not None:
                done, total = step + 1, len(timesteps)
                show = done % every == 0 or done == total
                preview = latent_preview(self.bundle, tensors["latents"]) if show else None
                on_progress(StepProgress(done, total, time.perf_counter() - started, preview))
            upcoming = timesteps[step + 1] if step + 1 < len(timesteps) else None
            if fitter is None or upcoming is None or not fitter.wants(pipe.scheduler, upcoming):
                return {}
            conditioning = self._fit_conditioning(pipe, tensors)
            return {"latents": fitter(pipe.scheduler, tensors["latents"], upcoming, conditioning)}

        return callback
