"""The demo trainer's data: procedural scenes rendered on every core, as tensors on the training device.

The UNet trains on scenes encoded once into latents (autoencoder.py caches them) and, for the grounding loss, on each
object's token positions and visible mask (grounding.py), cached as safetensors beside them.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from .grounding import GroundingTargets, grounding_targets
from .optim import log
from .scenes import random_scene
from .tokenizer import load_tokenizer


def workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _render_chunk(seeds: range) -> tuple[np.ndarray, list[str]]:
    scenes = [random_scene(s) for s in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def render_scenes(start: int, n: int, chunk: int = 1000) -> tuple[np.ndarray, list[str]]:
    """Images [n, 64, 64, 3] uint8 and captions of seeds start..start+n-1, rendered on every core (spawned
    workers: the parent may hold a CUDA context, which forked children must not inherit)."""
    chunks = [range(s, min(start + n, s + chunk)) for s in range(start, start + n, chunk)]
    with multiprocessing.get_context("spawn").Pool(min(workers(), len(chunks))) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate([images for images, _ in parts]), [c for _, caps in parts for c in caps]


def to_unit_range(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """[n, 64, 64, 3] uint8 -> [n, 3, 64, 64] float in [-1, 1] on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def latent_aligned_crops(images: torch.Tensor, latents: torch.Tensor | None, g: torch.Generator):
    """One random 32x32 crop (at a multiple of 4 px, so it matches an 8x8 latent crop) of a batch."""
    ly, lx = torch.randint(0, 9, (2,), generator=g).tolist()
    crop = images[:, :, 4 * ly : 4 * ly + 32, 4 * lx : 4 * lx + 32]  # [B, 3, 32, 32]
    return crop, None if latents is None else latents[:, :, ly : ly + 8, lx : lx + 8]  # [B, 4, 8, 8]


def _grounding_chunk(job: tuple[str, range]) -> GroundingTargets:
    tokenizer_dir, seeds = job
    return grounding_targets([random_scene(s) for s in seeds], load_tokenizer(tokenizer_dir))


def load_grounding_targets(work: Path, n: int) -> GroundingTargets:
    """Token positions and visible masks of every object of the first n training scenes (cached)."""
    from safetensors.torch import load_file, save_file

    path = work / f"grounding_{n}.safetensors"
    if path.exists():
        return GroundingTargets(**load_file(str(path)))
    log(f"grounding: collecting the objects of {n} scenes")
    jobs = [(str(work / "tokenizer"), range(s, min(n, s + 1000))) for s in range(0, n, 1000)]
    with multiprocessing.get_context("spawn").Pool(min(workers(), len(jobs))) as pool:
        parts = pool.map(_grounding_chunk, jobs)
    targets = GroundingTargets(torch.cat([t.positions for t in parts]), torch.cat([t.masks for t in parts]))
    save_file(dict(positions=targets.positions, masks=targets.masks), str(path))
    return targets


class TrainingSet:
    """The cached scenes on the training device: scaled latents, caption token ids and grounding targets."""

    def __init__(self, work: Path, latents_path: Path, tokenizer, device: torch.device, grounding: bool) -> None:
        data = np.load(latents_path)
        self.latents = torch.from_numpy(data["latents"].astype(np.float32)).to(device)  # [N, 4, 16, 16]
        captions = list(data["captions"])

        def tokenize(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            return ids.input_ids.to(device)

        self.ids = tokenize(captions)  # [N, 77]
        self.empty_ids = tokenize([""])  # [1, 77]
        self.targets = None
        if grounding:
            t = load_grounding_targets(work, len(captions))
            self.targets = GroundingTargets(t.positions.to(device), t.masks.to(device))

    def __len__(self) -> int:
        return len(self.latents)
