"""The choices every layer offers: limits of one request, samplers, model families, precisions, devices.

One table per set of choices: the UI's widgets, the CLI's flags, the engines and the benchmarks read these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "demo")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")
OFFLOADS: tuple[str, ...] = ("none", "model", "sequential")
DTYPES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")  # what a machine preset may name (any torch device works)


# ------------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the CLI, the UI's sliders and the dataclasses below read these."""

    steps: int = 150
    images: int = 8
    cfg: float = 30.0
    min_side: int = 64  # pixels; sizes are multiples of 8
    max_side: int = 4096
    photos: int = 10  # per subject
    regions: int = 16  # per canvas


LIMITS = Limits()


@dataclass(frozen=True)
class Sampler:
    """A sampler as people name it (A1111's names) and the diffusers scheduler that runs it."""

    title: str
    scheduler: str | None  # a diffusers scheduler class; None keeps the model's own
    options: tuple[tuple[str, Any], ...] = ()  # passed to `from_config`


SCHEDULERS: dict[str, Sampler] = {
    "default": Sampler("Default", None),
    "ddim": Sampler("DDIM", "DDIMScheduler"),
    "euler": Sampler("Euler", "EulerDiscreteScheduler"),
    "euler_a": Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": Sampler(
        "DPM++ 2M", "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
    ),
    "lms": Sampler("LMS", "LMSDiscreteScheduler"),
    "pndm": Sampler("PNDM", "PNDMScheduler", (("skip_prk_steps", True),)),
}
