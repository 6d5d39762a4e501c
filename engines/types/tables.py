"""The choices every layer offers: limits of one request, samplers, model families, precisions, devices.

One table per set of choices: the UI's widgets, the CLI's flags, the engines and the benchmarks read these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "demo")
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
class JobCap:
    """What one visitor's job may cost where many share one GPU queue (a Space, a shared link): one visitor must not
    hold the app for everyone (issue 20: 8 images of 512² at 150 steps kept another visitor's 0.4 s job waiting
    65 s). engines/job_cost.py checks a request against it before any work; the UI's sliders stop at it."""

    work: float  # image-steps at the model's native size (engines/job_cost.py counts fitting and references in)
    area: float  # the largest image, in multiples of the model's native area (4: twice the native side)
    steps: int
    images: int
    relation_steps: int  # training steps of one relation
    jobs_per_visitor: int  # GPU jobs one visitor may have waiting or running at once


# "shared": 40 steps of 4 native-size images, or one image of twice the side; 1000 relation steps is the UI
# slider's top; one job at a time keeps the queue fair (a second click waits for the first's result anyway).
JOB_CAPS: dict[str, JobCap] = {
    "shared": JobCap(work=160.0, area=4.0, steps=50, images=4, relation_steps=1000, jobs_per_visitor=1),
}


@dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized on load (engines/models.py), through diffusers' quantization configs."""

    title: str
    backend: str | None  # "bitsandbytes" (CUDA only) or "torchao" (CPU and CUDA); None: full precision
    weights: str  # what the weights become: "int8", "nf4" or "int8-weight-only"
    text_encoders: bool = False  # also the text encoders (generation only: registration loads float copies)
    about: str = ""

    @property
    def cuda_only(self) -> bool:
        return self.backend == "bitsandbytes"


# The UNet holds 70-85% of the weights, so it is what the presets quantize. Quantizing the text encoders too saves
# ~0.25 GB on SD 1.5 and ~0.9 GB on SDXL (fp16) but costs registration a reload of the float encoders it trains.
# The keys "int8" and "nf4" are older than this table (and are what PNGs and saved settings carry); they quantized
# the text encoders too until registration needed them float.
QUANTIZATIONS: dict[str, Quantization] = {
    "none": Quantization("none", None, "", about="the model's own precision"),
    "int8": Quantization("int8 (bitsandbytes)", "bitsandbytes", "int8", about="UNet in LLM.int8; CUDA"),
    "nf4": Quantization("nf4 (bitsandbytes)", "bitsandbytes", "nf4", about="UNet in 4-bit NF4; CUDA"),
    "nf4-all": Quantization(
        "nf4, text encoders too", "bitsandbytes", "nf4", True, "UNet and text encoders in 4-bit NF4; CUDA"
    ),
    "torchao-int8": Quantization(
        "int8 weight-only (torchao)", "torchao", "int8-weight-only", about="UNet weights int8; CPU or CUDA"
    ),
    "torchao-int8-all": Quantization(
        "int8 weight-only, text encoders too", "torchao", "int8-weight-only", True, "CPU or CUDA"
    ),
}


@dataclass(frozen=True)
class Sampler:
    """A sampler as people name it (A1111's names) and the diffusers scheduler that runs it."""

    title: str  # A1111's name: what the UI, the CLI's help and the PNG's `parameters` say
    scheduler: str | None  # a diffusers scheduler class; None keeps the model's own
    options: tuple[tuple[str, Any], ...] = ()  # passed to `from_config`; the PNG's sampler is found by them too
    comfyui: str | None = None  # ComfyUI's `sampler_name` for it (with its "karras" schedule when `karras`)

    @property
    def karras(self) -> bool:
        return dict(self.options).get("use_karras_sigmas", False)


_KARRAS = (("use_karras_sigmas", True),)
_NO_KARRAS = (("use_karras_sigmas", False),)  # stated, so a model whose own config has Karras sigmas still gets these
_DPMPP_2M = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))

# The keys are what requests (and every PNG made so far) store; "default", "ddim", "euler", "euler_a", "dpmpp_2m",
# "lms" and "pndm" are older than the A1111 titles and must keep their meaning.
SCHEDULERS: dict[str, Sampler] = {
    "default": Sampler("Default", None),  # the model's own; the PNG names the sampler that ran (engines/metadata.py)
    "euler": Sampler("Euler", "EulerDiscreteScheduler", _NO_KARRAS, "euler"),
    "euler_a": Sampler("Euler a", "EulerAncestralDiscreteScheduler", (), "euler_ancestral"),
    "dpmpp_2m": Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP_2M + _NO_KARRAS, "dpmpp_2m"),
    "dpmpp_2m_karras": Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _DPMPP_2M + _KARRAS, "dpmpp_2m"),
    # diffusers' DPMSolverSDEScheduler draws its noise with torchsde's Brownian tree (a runtime requirement)
    "dpmpp_sde_karras": Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", _KARRAS, "dpmpp_sde"),
    "ddim": Sampler("DDIM", "DDIMScheduler", (), "ddim"),
    "unipc": Sampler("UniPC", "UniPCMultistepScheduler", _NO_KARRAS, "uni_pc"),
    "lms": Sampler("LMS", "LMSDiscreteScheduler", _NO_KARRAS, "lms"),
    "heun": Sampler("Heun", "HeunDiscreteScheduler", _NO_KARRAS, "heun"),
    "lcm": Sampler("LCM", "LCMScheduler", (), "lcm"),  # for LCM-distilled models and LCM LoRAs
    "pndm": Sampler("PLMS", "PNDMScheduler", (("skip_prk_steps", True),)),  # A1111's PLMS is PNDM without its PRK steps
}
SAMPLER_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms"}  # older spellings


def sampler_key(name: str) -> str | None:
    """The key of SCHEDULERS for a key, an A1111 title or an alias, in any case; None when there is none."""
    wanted = " ".join(name.strip().lower().replace("_", " ").split())
    for key, sampler in SCHEDULERS.items():
        if wanted in (key.replace("_", " "), sampler.title.lower()):
            return key
    return SAMPLER_ALIASES.get(wanted.replace(" ", "_"))


def sampler_title(key: str, scheduler_class: str, config: dict[str, Any]) -> str:
    """The A1111 name of the sampler that ran: the table's title, or for "default" the entry matching the model's
    own scheduler (its class and every option it sets); a scheduler the table lacks is named by its class."""
    if SCHEDULERS[key].scheduler is not None:
        return SCHEDULERS[key].title
    for sampler in SCHEDULERS.values():
        defaults = {"use_karras_sigmas": False}  # a config without the option has none
        if sampler.scheduler == scheduler_class and all(
            config.get(option, defaults.get(option)) == value for option, value in sampler.options
        ):
            return sampler.title
    return scheduler_class.removesuffix("Scheduler")
