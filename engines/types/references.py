"""Reference identity settings: how the subjects' photos reach the picture (SynCD §4) and how it may start
(MS-CustomNet's layered layout map). The algorithms are engines/references.py, engines/image_guidance.py and
engines/collage.py."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.checks import finite, require

START_MODES: tuple[str, ...] = ("noise", "collage")
# The CLI's --references and the UI's radio: "auto" leaves the choice to the engine (on when a subject has photos)
REFERENCE_SWITCHES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def reference_switch(enabled: bool | None) -> str:
    """ReferenceConfig.enabled as the CLI and the UI name it (the inverse of REFERENCE_SWITCHES)."""
    return next(name for name, value in REFERENCE_SWITCHES.items() if value == enabled)


@dataclass(frozen=True)
class ReferenceConfig:
    """The target's self-attention also reads the foreground of the subjects' photos, re-noised to each step's t;
    with a layout, each region reads only its own subject's photos, and the front layer owns overlaps."""

    enabled: bool | None = None  # None: on whenever a subject the prompt names has photos; results record which
    strength: float = 2.0  # attention on the reference tokens is multiplied by this (1: as the model weighs them);
    # 2 beat 1 on the bench and on held-out scenes, with and without the adapter (docs/references.md)
    adapter: bool = True  # use the model's reference adapter when it has one (SynCD's trained LoRA)
    image_guidance: float = 0.0  # λ_I of SynCD Eq. 4; 0: plain CFG, where only the conditional branch sees photos
    image_guidance_growth: float = 0.0  # λ_I grows by this much from t = T to t = 0 (SynCD's adaptive schedule)
    start: str = "noise"  # "collage": start from the subjects' cut-outs placed in their boxes, back to front
    start_strength: float = 0.75  # with a collage: the share of the trajectory that is denoised (1: all of it)

    def __post_init__(self) -> None:
        require(self.enabled in (None, True, False), "references: enabled must be true, false or null")
        require(finite(self.strength) and 0.0 <= self.strength <= 8.0, "reference strength must be in 0..8")
        require(self.adapter in (True, False), "references: adapter must be true or false")
        for name in ("image_guidance", "image_guidance_growth"):
            value = getattr(self, name)
            require(finite(value) and 0.0 <= value <= 30.0, f"{name.replace('_', ' ')} must be in 0..30")
        require(self.start in START_MODES, f"unknown start '{self.start}' (choose from {', '.join(START_MODES)})")
        require(finite(self.start_strength) and 0.0 < self.start_strength <= 1.0, "start strength must be in (0, 1]")

    @property
    def guides_images(self) -> bool:
        return self.image_guidance > 0 or self.image_guidance_growth > 0

    def image_scale(self, timestep: float, train_steps: int = 1000) -> float:
        """λ_I(t) = image_guidance + growth · (T − t) / T, never below 0 (SynCD's schedule, notes §4.3)."""
        return max(
            0.0, self.image_guidance + self.image_guidance_growth * (train_steps - float(timestep)) / train_steps
        )
