"""Subjects: their names, what the UI shows of one, how one is registered (the presets table) and the request."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from engines.types.checks import control_free, require, reserved_name
from engines.types.tables import LIMITS

SUBJECT_NAME_RULE = "1–40 letters, digits, '_' or '-', starting with a letter or digit"
CLASS_WORD_RULE = "1–100 characters: letters (any language), digits, spaces and - ' ."
CLASS_WORD_CHARS = 100
# Letters of any script (a person may say "chien" or "猫") and the marks that some scripts write letters with; no
# symbols: an emoji or a pictograph is not a word the text encoder was trained to name things with, and the residual
# is learned on the class word's tokens.
_CLASS_WORD_CATEGORIES = ("L", "M", "N")


def check_subject_name(name: str) -> str:
    """A subject's name is also its folder name and its `<name>` in prompts, so it is kept strictly simple. Two names
    that differ only in case are one folder on macOS and Windows: the library compares them without case."""
    ok = isinstance(name, str) and 1 <= len(name) <= 40 and name[0].isascii() and name[0].isalnum()
    ok = ok and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    require(ok, f"subject name {name!r} is not allowed: use {SUBJECT_NAME_RULE}")
    require(not reserved_name(name), f"subject name {name!r} is a device name on Windows: pick another")
    return name


def check_class_word(word: str, where: str = "the class word") -> str:
    """The class word (dog, coffee mug, teddy bear) before any work is done on it; returned with its spaces
    normalised. How many tokens it takes is checked against the model's tokenizer when the model is there."""
    require(isinstance(word, str), f"{where} must be text")
    require(control_free(word), f"{where} {word!r} holds control characters (newline, escape...): type plain words")
    word = " ".join(word.split())
    require(bool(word), f"{where} is empty: say what the subject is (dog, mug, toy...)")
    require(len(word) <= CLASS_WORD_CHARS, f"{where} must be at most {CLASS_WORD_CHARS} characters (got {len(word)})")
    odd = sorted({c for c in word if c not in " -'." and unicodedata.category(c)[0] not in _CLASS_WORD_CATEGORIES})
    require(not odd, f"{where} {word!r} has {' '.join(odd)}: use {CLASS_WORD_RULE}")
    return word


@dataclass(frozen=True)
class SubjectInfo:
    """What the UI shows of a registered subject (its residuals stay in the engine)."""

    name: str
    class_word: str
    family: str
    fingerprint: str  # of the text encoder(s) it was trained against
    created: str  # ISO 8601
    steps: int
    loss_curve: tuple[float, ...] = ()
    thumbnail: str | None = None  # path of a PNG
    photos: tuple[str, ...] = ()  # paths of the cropped photos
    photo_loss: tuple[float, float] | None = None  # denoising loss on its photos before and after registration (fixed
    # noise and timesteps): one that hardly falls means the preset's learning rate is too low for this model
    has_residual: bool = True  # False: an instant subject, which reaches pictures through its photos alone

    @property
    def holds(self) -> str:
        """What the subject carries, as the CLI and the UI say it: one whose photo files were deleted has only its
        residual (no reference identity); an instant one has only photos (it works with any model)."""
        if self.has_residual:
            # the library lists the photos it wrote; the files may since have been deleted by hand
            return "residual + photos" if any(Path(p).is_file() for p in self.photos) else "residual only"
        return "photos only"


@dataclass(frozen=True)
class RegisterPreset:
    """How a subject is registered (engines/register/); the numbers are discussed in docs/registration.md."""

    steps: int
    lr: float
    reg_weight: float  # λ of Cones 2 Eq. 4
    batch: int  # photos (latents) per step for L_sub
    reg_batch: int  # bank sentences per step for L_reg
    reg_pool: int  # bank sentences whose frozen outputs are precomputed for L_reg
    delta_sentences: int  # bank sentences averaged in Eq. 5
    checkpoint_every: int  # steps between resumable checkpoints (0: only when cancelled); a checkpoint holds the
    # fp32 encoder(s) and AdamW moments (~1.5 GB for SD 1.5, ~10 GB for SDXL), so it is written sparingly
    gpu_seconds: float  # what one registration may take on a Space's GPU (ZeroGPU's duration)
    gradient_checkpointing: bool = False
    warmup: float = 0.1  # fraction of the steps over which the lr ramps up (Adam's first steps are sign-like)
    why: str = ""


# Cones 2 trains the whole encoder 4,000 steps at lr 5e-6, batch 1 (~25 min on an A100, notes §1.2). The encoder only
# has to move the class token's output and L_reg (over a sentence bank) keeps the rest in place, so a larger lr with a
# batch of photos reaches a usable Δ in a few hundred steps. λ = 1: both terms are per-element mean squares.
REGISTER_PRESETS: dict[str, RegisterPreset] = {
    "instant": RegisterPreset(
        steps=0,
        lr=0.0,
        reg_weight=0.0,
        batch=0,
        reg_batch=0,
        reg_pool=0,
        delta_sentences=0,
        checkpoint_every=0,
        gpu_seconds=20.0,
        why="no training: the photos and their masks are kept, and the subject reaches pictures "
        "through them (reference attention); works with every model",
    ),
    "quick": RegisterPreset(
        steps=120,
        lr=3e-5,
        reg_weight=1.0,
        batch=2,
        reg_batch=4,
        reg_pool=128,
        delta_sentences=256,
        checkpoint_every=0,
        gpu_seconds=40.0,
        why="a first look in seconds: few steps at a high lr; Δ from 256 sentences (its mean is already stable)",
    ),
    "standard": RegisterPreset(
        steps=300,
        lr=1.5e-5,
        reg_weight=1.0,
        batch=4,
        reg_batch=8,
        reg_pool=256,
        delta_sentences=1000,
        checkpoint_every=150,
        gpu_seconds=90.0,
        why="the default: 300 steps × 4 photos at 3× the paper's lr; Δ over the paper's 1,000 sentences",
    ),
    "thorough": RegisterPreset(
        steps=800,
        lr=8e-6,
        reg_weight=1.0,
        batch=4,
        reg_batch=16,
        reg_pool=512,
        delta_sentences=1000,
        checkpoint_every=200,
        gpu_seconds=180.0,
        gradient_checkpointing=True,
        why="closer to the paper's recipe (lower lr, more steps, a larger L_reg batch) for hard subjects; "
        "gradient checkpointing keeps SDXL within 24 GB",
    ),
}
# One learning rate for every preset on a model family that needs its own (docs/registration.md).
FAMILY_LR: dict[str, float] = {"demo": 3e-4}


@dataclass(frozen=True)
class RegisterRequest:
    name: str
    class_word: str
    photos: tuple[str, ...]  # paths of the person's photos
    preset: str = "standard"
    use_masks: bool = True  # weight the loss by each photo's foreground mask
    seed: int = 0

    def __post_init__(self) -> None:
        check_subject_name(self.name)
        check_class_word(self.class_word)
        require(
            1 <= len(self.photos) <= LIMITS.photos,
            f"give 1–{LIMITS.photos} photos of the subject (got {len(self.photos)})",
        )
        require(
            self.preset in REGISTER_PRESETS,
            f"unknown preset '{self.preset}' (choose from {', '.join(REGISTER_PRESETS)})",
        )


@dataclass(frozen=True)
class LibraryProblem:
    """One entry of the library that is broken or not Troupe's (`python -m studio subjects check`)."""

    entry: str  # its path inside the library, control characters escaped
    problem: str  # one line
    moved_to: str | None = None  # where --repair moved it (inside the library's .broken/), else None
