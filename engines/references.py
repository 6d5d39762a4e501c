"""Reference identity (SynCD §4.2–4.3): the subjects' photos reach the picture through masked shared attention.

Per request, once: each subject's photos are encoded by the VAE, and for every attention resolution a mask says which
target cell may attend to which reference token — a cell owned by a subject's region (front layer wins, the same
ownership as layout guidance) reads only that subject's photos, and only their (dilated) foreground; other cells read
the photos of subjects that have no region, or none.

Per step: the reference latents are re-noised to the step's t with fresh noise, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, and run
through the UNet once, batched, with the prompt "a photo of a {class}" and the reference adapter off ("write"); then
the target's call reads them (kernels/reference_attention.py). That is one extra UNet call per step, on the
references alone; a box-fitting call at the same t reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engines.layout import attention_resolutions, region_owners, sigma_at
from engines.reference_adapter import has_adapter, load_adapter
from engines.types import Layout, ReferenceConfig
from kernels.maps import BACKGROUND
from kernels.reference_attention import ReferenceState, install_references

REFERENCE_PROMPT = "a photo of a {cls}"  # SynCD's reference-pass prompt
FOREGROUND_SHARE = 0.3  # a reference cell is foreground when this much of it is masked in
DILATION = 1  # cells added around a reference's foreground at every resolution (SynCD dilates its masks)


def attach_pending_adapter(bundle) -> bool:
    """Attach the adapter the model left for its first use (engines/models.py); whether the UNet has one."""
    unet = bundle.pipe.unet
    if bundle.pending_adapter is not None and not has_adapter(unet):
        load_adapter(unet, bundle.pending_adapter)
    return has_adapter(unet)


@dataclass(frozen=True)
class ReferencePhoto:
    subject: str
    class_word: str
    photo: Image.Image  # RGB
    mask: Image.Image  # L, 255 = the subject


@dataclass(frozen=True)
class EncodedReferences:
    subjects: tuple[str, ...]  # per reference, whose photo it is
    latents: torch.Tensor  # (R, 4, h, w) scaled VAE latents (means)
    masks: torch.Tensor  # (R, S, S) float in [0, 1]: the foreground at the photos' pixel size
    prompts: tuple[str, ...]  # per reference, the reference pass's prompt


@torch.no_grad()
def encode_references(bundle, photos: Sequence[ReferencePhoto]) -> EncodedReferences:
    """The photos at the model's native size, through its VAE (the mean; no sampling noise)."""
    side, vae = bundle.native_size, bundle.pipe.vae
    pixels = torch.stack([image_tensor(p.photo.convert("RGB").resize((side, side), Image.LANCZOS)) for p in photos])
    masks = torch.stack([image_tensor(p.mask.convert("L").resize((side, side), Image.BILINEAR))[0] for p in photos])
    pixels = pixels * 2 - 1  # (R, 3, S, S) in [-1, 1]
    latents = vae.encode(pixels.to(bundle.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    prompts = tuple(REFERENCE_PROMPT.format(cls=p.class_word) for p in photos)
    return EncodedReferences(tuple(p.subject for p in photos), latents, masks, prompts)


def image_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, np.float32) / 255.0
    return torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1)  # (C, H, W)


def reference_cells(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Which cells of each reference, at a height × width resolution, are foreground (dilated): (R, h·w) bool."""
    share = F.adaptive_avg_pool2d(masks[:, None].float(), (height, width))  # (R, 1, h, w)
    cells = (share >= FOREGROUND_SHARE).float()
    if DILATION:
        cells = F.max_pool2d(cells, 2 * DILATION + 1, stride=1, padding=DILATION)
    return cells.flatten(1) > 0  # (R, h·w)


def cell_readers(layout: Layout, subjects: Sequence[str], height: int, width: int) -> torch.Tensor:
    """Which subjects' photos each target cell may read: (h·w, len(subjects)) bool. A cell owned by a subject's
    region reads that subject alone; any other cell reads the subjects that have no region."""
    owner = region_owners(layout, height, width).view(-1)  # (h·w,)
    placed = {r.subject for r in layout.regions if r.subject}
    readers = torch.zeros(owner.numel(), len(subjects), dtype=torch.bool)
    for column, subject in enumerate(subjects):
        owned = [i for i, r in enumerate(layout.regions) if r.subject == subject]
        if owned:
            readers[:, column] = torch.isin(owner, torch.tensor(owned))
        else:
            free = torch.tensor([owner_index == BACKGROUND or not layout.regions[owner_index].subject
                                 for owner_index in owner.tolist()])  # fmt: skip
            readers[:, column] = free if placed else True
    return readers


def routing_masks(layout: Layout, refs: EncodedReferences, latent_size: tuple[int, int], levels: int,
                  reference_latent: tuple[int, int]) -> dict[int, torch.Tensor]:  # fmt: skip
    """For every attention resolution, keyed by the target's token count N: (N, M) bool, may target cell n attend
    reference token m. The references' tokens are side by side, reference by reference, as the reference pass
    stores them."""
    subjects = sorted(set(refs.subjects))
    owners = torch.tensor([subjects.index(s) for s in refs.subjects])  # (R,)
    masks = {}
    target_levels = attention_resolutions(*latent_size, levels)
    reference_levels = attention_resolutions(*reference_latent, levels)
    for (height, width), (ref_height, ref_width) in zip(target_levels, reference_levels):
        readers = cell_readers(layout, subjects, height, width)[:, owners]  # (N, R)
        foreground = reference_cells(refs.masks, ref_height, ref_width)  # (R, m)
        allowed = readers[:, :, None] & foreground[None]  # (N, R, m)
        masks[height * width] = allowed.reshape(height * width, -1)  # (N, R·m)
    return masks


class ReferencePass:
    """Installs the reference processors and a UNet pre-hook that runs the reference pass before each target call.

    `guidance` (kernels.region_attention.GuidanceState or None) is suspended during the reference pass: layout
    guidance belongs to the target alone."""

    def __init__(self, bundle, refs: EncodedReferences, masks: dict[int, torch.Tensor], config: ReferenceConfig,
                 rows: int, seed: int, guidance=None) -> None:  # fmt: skip
        self.bundle, self.refs, self.guidance = bundle, refs, guidance
        self.state = ReferenceState(masks, strength=config.strength, rows=rows)
        self.noise = torch.Generator("cpu").manual_seed(seed + 7_919)
        self.condition = self._condition()
        self.alphas = bundle.pipe.scheduler.alphas_cumprod.cpu()
        self.running, self.last_timestep, self.previous, self.hook = False, None, None, None
        self.passes = 0
        self.adapter = config.adapter and attach_pending_adapter(bundle)  # on in the target's calls only

    def _condition(self) -> dict:
        """The UNet's text conditioning for the reference pass: one prompt per reference, no CFG."""
        pipe, count = self.bundle.pipe, len(self.refs.prompts)
        if self.bundle.is_xl:
            embeds, _, pooled, _ = pipe.encode_prompt(list(self.refs.prompts), device=self.bundle.device,
                                                      do_classifier_free_guidance=False)  # fmt: skip
            side = self.bundle.native_size
            time_ids = torch.tensor([[side, side, 0, 0, side, side]] * count, device=self.bundle.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}
        embeds, _ = pipe.encode_prompt(list(self.refs.prompts), self.bundle.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def __enter__(self) -> ReferencePass:
        unet = self.bundle.pipe.unet
        self.previous = install_references(unet, self.state)
        self.hook = unet.register_forward_pre_hook(self._before_target, with_kwargs=True)
        self.state.mode = "read"
        if self.adapter:
            unet.enable_adapters()
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        if self.adapter:
            self.bundle.pipe.unet.disable_adapters()
        self.bundle.pipe.unet.set_attn_processor(self.previous)
        self.state.mode = "off"

    def _before_target(self, _module, args, kwargs) -> None:
        if self.running:
            return
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if t != self.last_timestep:
            self.run_reference_pass(t)
            self.last_timestep = t

    @torch.no_grad()
    def run_reference_pass(self, timestep: float) -> None:
        """Re-noise the references to t (fresh noise) and let every self-attention layer store their tokens."""
        unet, latents = self.bundle.pipe.unet, self.refs.latents
        alpha = 1.0 / (1.0 + sigma_at(self.alphas, timestep) ** 2)  # ᾱ_t
        noise = torch.randn(latents.shape, generator=self.noise).to(latents.device, latents.dtype)
        noisy = math.sqrt(alpha) * latents + math.sqrt(1 - alpha) * noise  # (R, 4, h, w)
        self.running, self.state.mode = True, "write"
        if self.guidance is not None:
            self.guidance.suspended = True
        if self.adapter:
            unet.disable_adapters()  # SynCD: the references pass through the base model
        try:
            unet(noisy.to(unet.dtype), torch.tensor(timestep, device=latents.device), **self.condition)
            self.passes += 1
        finally:
            self.running, self.state.mode = False, "read"
            if self.guidance is not None:
                self.guidance.suspended = False
            if self.adapter:
                unet.enable_adapters()
