"""Everything registration encodes once, before the first training step (papers/cones2.txt Eq. 2, 3 and 5).

- the photos (and their mirror images) as VAE latent distributions, with a loss weight per latent pixel (Eq. 2);
- the training prompt "a photo of {class}" and the frozen half of its spliced condition (Eq. 2, Eq. 6);
- the L_reg pool: bank sentences, the frozen encoder's outputs on them and the positions L_reg pins (Eq. 3);
- the Δ bank with its frozen class-token outputs (Eq. 5), and held-out sentences to measure preservation on.

The frozen outputs come from the copy about to be tuned, before its first step (identical to E under the same
autocast), so no second encoder is kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engines.images import PreparedPhoto
from engines.register.backbone import Backbone
from engines.register.bank import (
    TRAIN_PROMPT,
    TokenizedBank,
    class_positions,
    class_token_ids,
    sentence_bank,
    split_bank,
    tokenize_bank,
)
from engines.register.condition import SplicedCondition, class_rows, sdxl_added_condition, unet_condition
from engines.types import RegisterPreset

HELDOUT_EVAL = 100  # held-out sentences on which preservation is measured after training
BACKGROUND_WEIGHT = 0.1  # loss weight outside the foreground mask (0 would ignore the background completely)


@dataclass(frozen=True)
class Photos:
    """Eq. 2's x: the subject's photos and their mirror images (which double the data for free)."""

    mean: torch.Tensor  # (2n, 4, h, w) posterior means, unscaled
    std: torch.Tensor  # (2n, 4, h, w) posterior standard deviations
    weights: torch.Tensor  # (2n, 1, h, w) loss weight per latent pixel


@dataclass(frozen=True)
class TrainingPrompt:
    """Eq. 2's c: the caption "a photo of {class}" and what the UNet is conditioned on besides Δ's rows."""

    ids: tuple[torch.Tensor, ...]  # per tokenizer (1, L) on the device
    condition: SplicedCondition
    added: dict[str, torch.Tensor] | None  # SDXL's pooled embedding and size ids; None for the other families


@dataclass(frozen=True)
class PreservationPool:
    """Eq. 3's C_class for L_reg: bank sentences, the frozen encoder's outputs on them, and the pinned positions."""

    ids: tuple[torch.Tensor, ...]  # per tokenizer (P, L), on the CPU
    targets: torch.Tensor  # (P, L, D) frozen outputs, fp32
    keep: torch.Tensor  # (P, L) bool: every position but the class word's

    def __len__(self) -> int:
        return self.targets.shape[0]


@dataclass(frozen=True)
class Evaluation:
    """The Δ bank with its frozen class-token rows (Eq. 5), and held-out sentences to measure preservation on."""

    delta_bank: TokenizedBank
    frozen_rows: tuple[torch.Tensor, ...]  # per encoder (N, n_cls, width) fp32
    heldout_ids: tuple[torch.Tensor, ...]  # per tokenizer (H, L) on the device
    heldout_frozen: torch.Tensor  # (H, L, D) fp32
    heldout_keep: torch.Tensor  # (H, L) bool: positions that are not the class word's


@dataclass(frozen=True)
class TrainingData:
    photos: Photos
    prompt: TrainingPrompt
    pool: PreservationPool
    evaluation: Evaluation
    n_class: tuple[int, ...]  # class-word tokens per tokenizer


@torch.no_grad()
def encode_photos(backbone: Backbone, prepared: list[PreparedPhoto], use_masks: bool) -> Photos:
    vae, device = backbone.vae, backbone.device
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(p.photo, np.float32) / 127.5 - 1.0).permute(2, 0, 1) for p in prepared]
    )  # (n, 3, H, W) in [-1, 1]
    masks = torch.stack(
        [torch.from_numpy(np.asarray(p.mask, np.float32) / 255.0)[None] for p in prepared]
    )  # (n, 1, H, W)
    pixels = torch.cat([pixels, pixels.flip(-1)])  # (2n, 3, H, W)
    masks = torch.cat([masks, masks.flip(-1)])  # (2n, 1, H, W)
    original = vae.dtype
    upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        means, stds = [], []
        for i in range(0, pixels.shape[0], 4):  # chunks: 20 photos at 1024 px in fp32 would not fit at once
            dist = vae.encode(pixels[i : i + 4].to(device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)  # (2n, 4, h, w)
    finally:
        if upcast:
            vae.to(original)
    weights = F.interpolate(masks.to(device), size=mean.shape[-2:], mode="area")  # (2n, 1, h, w)
    if not use_masks:
        weights = torch.ones_like(weights)
    else:
        weights = BACKGROUND_WEIGHT + (1 - BACKGROUND_WEIGHT) * weights
    return Photos(mean, std, weights)


def _on(device: torch.device, ids: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device) for x in ids)


@torch.no_grad()
def _training_prompt(backbone: Backbone, encoders, prompt: TokenizedBank, n_class) -> TrainingPrompt:
    ids = _on(backbone.device, prompt.ids)  # per tokenizer (1, L)
    with backbone.autocast():
        frozen = unet_condition(encoders, ids, backbone.xl).float()  # (1, L, D)
    is_class = class_positions(prompt, n_class).to(backbone.device)  # (1, L)
    added = sdxl_added_condition(encoders, ids, backbone.native_size, backbone.device) if backbone.xl else None
    return TrainingPrompt(ids, SplicedCondition(frozen, is_class), added)


@torch.no_grad()
def _preservation_pool(backbone: Backbone, encoders, reg: TokenizedBank, n_class) -> PreservationPool:
    with backbone.autocast():
        targets = torch.cat(
            [
                unet_condition(encoders, [x[i : i + 64].to(backbone.device) for x in reg.ids], backbone.xl).float()
                for i in range(0, len(reg.sentences), 64)
            ]
        )  # (P, L, D)
    keep = ~class_positions(reg, n_class).to(backbone.device)  # (P, L)
    return PreservationPool(reg.ids, targets, keep)


@torch.no_grad()
def _evaluation(backbone: Backbone, encoders, delta_bank: TokenizedBank, heldout: TokenizedBank, n_class) -> Evaluation:
    frozen_rows = class_rows(encoders, delta_bank, n_class, backbone.device, backbone.xl)
    heldout_ids = _on(backbone.device, heldout.ids)  # per tokenizer (H, L)
    heldout_frozen = unet_condition(encoders, heldout_ids, backbone.xl).float()  # (H, L, D), fp32 without autocast
    heldout_keep = ~class_positions(heldout, n_class).to(backbone.device)  # (H, L)
    return Evaluation(delta_bank, tuple(frozen_rows), heldout_ids, heldout_frozen, heldout_keep)


def encode_training_data(
    backbone: Backbone,
    tokenizers: list,
    encoders,
    class_word: str,
    preset: RegisterPreset,
    prepared: list[PreparedPhoto],
    use_masks: bool,
) -> TrainingData:
    """Tokenize the bank and encode everything the steps and the final measurements read."""
    n_class = tuple(len(class_token_ids(t, class_word)) for t in tokenizers)
    bank = sentence_bank(class_word, max(preset.delta_sentences, preset.reg_pool * 10 // 9 + 10))
    train_sentences, heldout_sentences = split_bank(bank)
    heldout = tokenize_bank(tokenizers, heldout_sentences[:HELDOUT_EVAL], class_word)
    reg = tokenize_bank(tokenizers, train_sentences[: preset.reg_pool], class_word)
    delta_bank = tokenize_bank(tokenizers, bank[: preset.delta_sentences], class_word)
    prompt = tokenize_bank(tokenizers, [TRAIN_PROMPT.format(cls=class_word)], class_word)
    pool = _preservation_pool(backbone, encoders, reg, n_class)
    training_prompt = _training_prompt(backbone, encoders, prompt, n_class)
    evaluation = _evaluation(backbone, encoders, delta_bank, heldout, n_class)
    return TrainingData(encode_photos(backbone, prepared, use_masks), training_prompt, pool, evaluation, n_class)
