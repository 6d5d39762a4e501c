"""Training batches for the reference adapter (engines/reference_training.py), from a dataset encoded once.

Every image of the dataset goes through the VAE once (the posterior mean) and stays in memory with its mask and the
box around it. A batch is B targets with k references each, noised to one t per target, and the routing masks of
generation (engines/references.py): a target cell inside the object's box (with a margin, as a drawn box has) may
read the foreground of its own references, nothing else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.layout import attention_resolutions, box_coverage
from engines.reference_dataset import ReferenceDataset
from engines.references import REFERENCE_PROMPT, image_tensor, reference_cells
from engines.types import InputError
from kernels.reference_attention import ReferenceState

BOX_MARGIN = 0.05  # of the image side, around the mask's bounding box
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
EMPTY_CAPTION_SHARE = 0.1  # captions dropped: the image-only branch of SynCD's guidance (Eq. 4) is learned too


@dataclass(frozen=True)
class TrainingBatch:
    noisy: torch.Tensor  # (B, 4, h, w) the targets at their t
    timesteps: torch.Tensor  # (B,)
    text: torch.Tensor  # (B, L, C) the targets' captions
    target: torch.Tensor  # (B, 4, h, w) what the UNet should predict: ε, or v for v-prediction models
    noisy_references: torch.Tensor  # (B·k, 4, h, w), target by target
    reference_timesteps: torch.Tensor  # (B·k,)
    reference_text: torch.Tensor  # (B·k, L, C) "a photo of a {class}"
    masks: dict[int, torch.Tensor]  # by tokens N: (B, N, k·m) bool
    references_per_target: int


class ReferenceBatches:
    def __init__(self, bundle, dataset: ReferenceDataset, validation_share: float, max_references: int) -> None:
        if bundle.is_xl:
            raise InputError("training the reference adapter runs on SD 1.x/2.x and the demo model, not SDXL yet")
        self.bundle, self.dataset = bundle, dataset
        self.scheduler = bundle.pipe.scheduler
        self.latents, self.masks, self.boxes = self._encode(dataset)
        count = len(dataset.objects)
        held = max(1, round(count * validation_share)) if count > 1 else 0
        usable = [i for i in range(count) if len(dataset.objects[i].images) > max_references]
        self.train = [i for i in usable if i < count - held]
        self.validation = [i for i in usable if i >= count - held]
        if not self.train:
            raise InputError(f"the dataset needs objects with at least {max_references + 1} images to train on")
        self.levels = len(bundle.pipe.unet.config.block_out_channels)

    @torch.no_grad()
    def _encode(self, dataset: ReferenceDataset):
        vae, side = self.bundle.pipe.vae, self.bundle.native_size
        latents, masks, boxes = [], [], []
        for index, item in enumerate(dataset.objects):
            views = [dataset.image(index, view) for view in range(len(item.images))]
            pixels = torch.stack([image_tensor(image.resize((side, side))) for image, _ in views]) * 2 - 1
            mask = torch.stack([image_tensor(m.resize((side, side)))[0] for _, m in views])  # (V, S, S)
            encoded = vae.encode(pixels.to(self.bundle.device, vae.dtype)).latent_dist.mean
            latents.append(encoded * vae.config.scaling_factor)
            masks.append(mask)
            boxes.append([_box(m) for m in mask])
        return latents, masks, boxes

    def sample(self, size: int, references: int, rng: random.Random, generator: torch.Generator,
               pool: list[int] | None = None, timestep: int | None = None) -> TrainingBatch:  # fmt: skip
        """B targets with k references each; `timestep` fixes t (validation), else t is uniform."""
        picks = [rng.choice(pool or self.train) for _ in range(size)]
        views = [rng.sample(range(len(self.boxes[i])), references + 1) for i in picks]
        total = self.scheduler.config.num_train_timesteps
        if timestep is None:
            steps = torch.randint(0, total, (size,), generator=generator)
        else:
            steps = torch.full((size,), timestep)
        clean = torch.stack([self.latents[i][v[0]] for i, v in zip(picks, views)])
        refs = torch.stack([self.latents[i][r] for i, v in zip(picks, views) for r in v[1:]])
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        ref_noise = torch.randn(refs.shape, generator=generator).to(refs)
        ref_steps = steps.repeat_interleave(references)
        captions = [
            self.dataset.objects[i].captions[v[0]] if rng.random() >= EMPTY_CAPTION_SHARE else ""
            for i, v in zip(picks, views)
        ]
        classes = [REFERENCE_PROMPT.format(cls=self.dataset.objects[i].class_word) for i in picks]
        return TrainingBatch(
            noisy=self.scheduler.add_noise(clean, noise, steps.to(clean.device)),
            timesteps=steps.to(clean.device),
            text=self._text(captions),
            target=self._target(clean, noise, steps.to(clean.device)),
            noisy_references=self.scheduler.add_noise(refs, ref_noise, ref_steps.to(refs.device)),
            reference_timesteps=ref_steps.to(refs.device),
            reference_text=self._text([c for c in classes for _ in range(references)]),
            masks=self._routing(picks, views, clean.shape[-2:]),
            references_per_target=references,
        )

    def _target(self, clean: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, steps)
        return noise

    @torch.no_grad()
    def _text(self, prompts: list[str]) -> torch.Tensor:
        embeds, _ = self.bundle.pipe.encode_prompt(prompts, self.bundle.device, 1, False)
        return embeds

    def _routing(self, picks: list[int], views: list[list[int]], latent: tuple[int, int]) -> dict[int, torch.Tensor]:
        """(B, N, k·m) per resolution: the target's box cells × its references' dilated foreground."""
        masks = {}
        for height, width in attention_resolutions(*latent, self.levels):
            rows = []
            for i, v in zip(picks, views):
                inside = box_coverage([self.boxes[i][v[0]]], height, width)[0].flatten() >= 0.5  # (N,)
                foreground = reference_cells(self.masks[i][v[1:]], height, width)  # (k, m)
                rows.append((inside[:, None, None] & foreground[None]).reshape(height * width, -1))
            masks[height * width] = torch.stack(rows).to(self.bundle.device)
        return masks

    @torch.no_grad()
    def validation_losses(self, unet, state, size: int = 32) -> dict:
        """The held-out objects' denoising loss at fixed t and noise: without references, with references through
        the base model, and with the adapter. Lower is better; the gaps are what the references and adapter add."""
        if not self.validation:
            return {}
        unet.eval()
        totals = {"no references": 0.0, "references": 0.0, "references + adapter": 0.0}
        for timestep in VALIDATION_TIMESTEPS:
            rng, generator = random.Random(timestep), torch.Generator("cpu").manual_seed(timestep)
            batch = self.sample(size, 1, rng, generator, pool=self.validation, timestep=timestep)
            unet.disable_adapters()
            plain = unet(batch.noisy, batch.timesteps, encoder_hidden_states=batch.text).sample
            reference_pass(unet, state, batch)
            base = target_pass(unet, state, batch, adapter=False)
            adapted = target_pass(unet, state, batch, adapter=True)
            for name, prediction in zip(totals, (plain, base, adapted)):
                totals[name] += float(F.mse_loss(prediction, batch.target)) / len(VALIDATION_TIMESTEPS)
        return {name: round(value, 5) for name, value in totals.items()}


@torch.no_grad()
def reference_pass(unet, state: ReferenceState, batch) -> None:
    state.grouped, state.mode = batch.references_per_target, "write"
    unet.disable_adapters()
    unet(batch.noisy_references, batch.reference_timesteps, encoder_hidden_states=batch.reference_text)


def target_pass(unet, state: ReferenceState, batch, adapter: bool = True) -> torch.Tensor:
    """The targets' prediction, reading the references the last reference pass stored. The adapter stays as set
    here until the next pass: peft's switch also sets requires_grad, and a LoRA switched off before backward()
    gets no gradient."""
    state.masks, state.device_bias, state.rows, state.mode = batch.masks, {}, batch.noisy.shape[0], "read"
    if adapter:
        unet.enable_adapters()
    else:
        unet.disable_adapters()
    try:
        return unet(batch.noisy, batch.timesteps, encoder_hidden_states=batch.text).sample
    finally:
        state.mode = "off"


def _box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """The mask's bounding box with a margin, in [0, 1] (the whole image when the mask is empty)."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(xs) == 0:
        return (0.0, 0.0, 1.0, 1.0)
    side_y, side_x = mask.shape
    return (
        max(0.0, float(xs.min()) / side_x - BOX_MARGIN),
        max(0.0, float(ys.min()) / side_y - BOX_MARGIN),
        min(1.0, float(xs.max() + 1) / side_x + BOX_MARGIN),
        min(1.0, float(ys.max() + 1) / side_y + BOX_MARGIN),
    )
