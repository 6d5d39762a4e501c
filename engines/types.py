"""Frozen dataclasses shared by the UI, the CLI and the engines, and the one table per set of choices.

Nothing here imports torch: these objects cross the boundary between `studio/` and `engines/`, are written into
PNG metadata and project files as JSON, and are validated once, when they are built. The tables (samplers, guidance
modes, registration presets, limits) are read by the UI, the CLI, the engines and the benchmarks alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the canvas
FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "demo")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")
OFFLOADS: tuple[str, ...] = ("none", "model", "sequential")
DTYPES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")  # what a machine preset may name (any torch device works)


class InputError(ValueError):
    """Bad input from a person (a box outside the canvas, an unknown subject...): shown as one readable line."""


class Cancelled(Exception):
    """The person pressed cancel; whatever was running stopped between two steps and changed nothing."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_keys(data: Any, where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """The one unknown-key check of every JSON Troupe reads: a typo never silently changes a picture."""
    _require(isinstance(data, dict), f"{where} must be a JSON object")
    unknown, missing = set(data) - set(allowed), set(required) - set(data)
    _require(not unknown, f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    _require(not missing, f"{where}: missing keys {', '.join(sorted(missing))}")
    return data


def unknown_subject(name: str, known: Iterable[str]) -> InputError:
    """The one message for a <name> that no registered subject has."""
    listed = ", ".join(f"<{n}>" for n in sorted(known)) or "none yet"
    return InputError(f"there is no subject named <{name}> (registered: {listed})")


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


@dataclass(frozen=True)
class Region:
    """A box on the canvas bound to some words of the prompt (or to a registered subject)."""

    phrase: str
    box: Box
    subject: str | None = None
    layer: int = 0  # 0 is the back; higher is in front

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        label = self.subject or self.phrase
        _require(bool(self.phrase.strip()) or self.subject is not None, "a region needs a phrase or a subject")
        _require(len(self.box) == 4, f"region '{label}': a box has four numbers x0,y0,x1,y1")
        x0, y0, x1, y1 = self.box
        _require(
            all(_finite(v) and 0.0 <= v <= 1.0 for v in self.box),
            f"region '{label}': box {self.box} must lie inside the canvas (every number in [0, 1])",
        )
        _require(x1 > x0 and y1 > y0, f"region '{label}': box {self.box} has zero area (need x0 < x1 and y0 < y1)")
        _require(isinstance(self.layer, int) and self.layer >= 0, f"region '{label}': layer must be an integer ≥ 0")

    @property
    def label(self) -> str:
        return f"<{self.subject}>" if self.subject else self.phrase


@dataclass(frozen=True)
class Layout:
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))

    def back_to_front(self) -> tuple[Region, ...]:
        """Regions sorted by layer; on equal layers, a later region is drawn in front (stable sort)."""
        return tuple(sorted(self.regions, key=lambda r: r.layer))


@dataclass(frozen=True)
class GuidanceConfig:
    """Layout guidance (Cones 2 §3.3, Eq. 7): add η(t)·M to the cross-attention logits of each region's tokens.

    η(t) = strength · log(1 + σ_t²) · std(QKᵀ); M = inside_weight in the region's cells, other_region_weight in
    cells owned by another region, background_weight in cells no region owns. The Cones 2 public code uses
    strength 0.08, inside 2.5 and −1e8 everywhere outside (notes/reference-implementations.md §1.4).

    Box fitting (`fit_iterations` > 0, engines/box_fitting.py) also moves the latent, before each early step, down
    the gradient of an energy that is low when every region's words are attended inside its box (Chen et al.'s
    backward guidance). It costs a UNet forward and backward per iteration, so it is off unless asked for.
    """

    FIT_ITERATIONS = 3  # box fitting when switched on (docs/layout.md: the demo bench's best trade)
    MAX_FIT_ITERATIONS = 10

    strength: float = 0.08
    inside_weight: float = 2.5
    other_region_weight: float = -1e8
    background_weight: float = 0.0
    guided_fraction: float = 1.0  # guide while t ≥ (1 − fraction)·T
    bound_self_attention: bool = False  # Bounded Attention: no self-attention between different regions
    fit_iterations: int = 0  # box fitting: latent updates before each fitted step; 0 = off
    fit_fraction: float = 0.5  # fit while t ≥ (1 − fraction)·T
    fit_scale: float = 30.0  # step size of the latent update (the public layout-guidance code's 30)

    def __post_init__(self) -> None:
        for name in (
            "strength",
            "inside_weight",
            "other_region_weight",
            "background_weight",
            "guided_fraction",
            "fit_fraction",
            "fit_scale",
        ):
            _require(_finite(getattr(self, name)), f"guidance {name} must be a finite number")
        _require(self.strength >= 0, "guidance strength must be ≥ 0")
        _require(0.0 <= self.guided_fraction <= 1.0, "guided fraction must be in [0, 1]")
        _require(
            type(self.fit_iterations) is int and 0 <= self.fit_iterations <= self.MAX_FIT_ITERATIONS,
            f"box-fitting iterations must be an integer in 0..{self.MAX_FIT_ITERATIONS}",
        )
        _require(0.0 <= self.fit_fraction <= 1.0, "box-fitting fraction must be in [0, 1]")
        _require(self.fit_scale >= 0, "box-fitting scale must be ≥ 0")

    @classmethod
    def cones2_public(cls) -> GuidanceConfig:
        """Exactly the public Cones 2 code: the subject's tokens are masked out everywhere but its region."""
        return cls(strength=0.08, inside_weight=2.5, other_region_weight=-1e8, background_weight=-1e8)

    @classmethod
    def off(cls) -> GuidanceConfig:
        return cls(strength=0.0)

    def fitted(self, iterations: int | None = None) -> GuidanceConfig:
        """The same guidance with box fitting on (the UI's "Fit objects to their boxes")."""
        return dataclasses.replace(self, fit_iterations=self.FIT_ITERATIONS if iterations is None else iterations)


@dataclass(frozen=True)
class GuidanceMode:
    title: str  # as tables and the UI show it
    config: GuidanceConfig
    about: str


GUIDANCE_MODES: dict[str, GuidanceMode] = {
    "off": GuidanceMode("none", GuidanceConfig.off(), "no layout guidance"),
    "cones2": GuidanceMode(
        "Cones 2 public settings",
        GuidanceConfig.cones2_public(),
        "the public Cones 2 code: a region's words are masked out everywhere but its box",
    ),
    "troupe": GuidanceMode("Troupe default", GuidanceConfig(), "Troupe's default layout guidance"),
    "troupe-fitted": GuidanceMode(
        "Troupe default + box fitting",
        GuidanceConfig().fitted(),
        "the default plus box fitting: objects drawn at their boxes' size (2-4x slower)",
    ),
}
GUIDANCE_ALIASES = {"none": "off", "cones2-public": "cones2"}  # the names the bench used before the CLI's


def guidance_mode(name: str, what: str = "guidance mode") -> GuidanceMode:
    """A mode of GUIDANCE_MODES by its name or an older alias."""
    key = GUIDANCE_ALIASES.get(name, name)
    _require(key in GUIDANCE_MODES, f"unknown {what} {name} (choose from {', '.join(GUIDANCE_MODES)})")
    return GUIDANCE_MODES[key]


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    layout: Layout = field(default_factory=Layout)
    relation: str | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    steps: int = 20
    cfg: float = 7.5
    scheduler: str = "default"
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)

    def __post_init__(self) -> None:
        _require(bool(self.prompt.strip()), "the prompt is empty: describe the picture first")
        _require(_whole(self.steps, 1, LIMITS.steps), f"steps must be an integer in 1..{LIMITS.steps}")
        _require(_finite(self.cfg) and 0.0 <= self.cfg <= LIMITS.cfg, f"CFG must be a number in 0..{LIMITS.cfg:g}")
        _require(
            self.scheduler in SCHEDULERS, f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULERS)})"
        )
        _require(_whole(self.num_images, 1, LIMITS.images), f"number of images must be 1..{LIMITS.images}")
        _require(self.seed is None or _whole(self.seed, 0, 2**63 - 1), "seed must be an integer ≥ 0")
        for name in ("width", "height"):
            size = getattr(self, name)
            _require(
                size is None or (_whole(size, LIMITS.min_side, LIMITS.max_side) and size % 8 == 0),
                f"{name} must be a multiple of 8 between {LIMITS.min_side} and {LIMITS.max_side}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateRequest:
        """Inverse of `to_dict`; unknown keys are an error, so a typo never silently changes a picture."""
        data = dict(_fields_of(cls, data, required=("prompt",)))
        layout = _fields_of(Layout, data.pop("layout", None) or {})
        regions = []
        for region in layout.get("regions", ()):
            region = _fields_of(Region, region, required=("phrase", "box"))
            _require(isinstance(region["box"], (list, tuple)), "a region's box must be a list of four numbers")
            regions.append(Region(**{**region, "box": tuple(region["box"])}))
        guidance = _fields_of(GuidanceConfig, data.pop("guidance", None) or {})
        return cls(**data, layout=Layout(tuple(regions)), guidance=GuidanceConfig(**guidance))


def _fields_of(kind: type, data: Any, required: Iterable[str] = ()) -> dict[str, Any]:
    return check_keys(data, kind.__name__, [f.name for f in dataclasses.fields(kind)], required)


@dataclass(frozen=True)
class GenerateResult:
    images: tuple[Any, ...]  # PIL.Image.Image, each carrying its metadata in `.info`
    seeds: tuple[int, ...]
    request: GenerateRequest
    metadata: tuple[dict[str, str], ...]  # the PNG text chunks of each image
    timings: dict[str, float]


@dataclass(frozen=True)
class StepProgress:
    """What a generation or registration reports after each step."""

    step: int  # 1-based
    total: int
    elapsed: float
    preview: Any = None  # PIL.Image.Image or None
    loss: float | None = None

    @property
    def eta(self) -> float:
        return self.elapsed / max(self.step, 1) * (self.total - self.step)


ProgressCallback = Callable[[StepProgress], None]


SUBJECT_NAME_RULE = "1–40 letters, digits, '_' or '-', starting with a letter or digit"


def check_subject_name(name: str) -> str:
    """A subject's name is also its folder name and its `<name>` in prompts, so it is kept strictly simple."""
    ok = isinstance(name, str) and 1 <= len(name) <= 40 and name[0].isascii() and name[0].isalnum()
    ok = ok and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    _require(ok, f"subject name {name!r} is not allowed: use {SUBJECT_NAME_RULE}")
    return name


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
        _require(bool(self.class_word.strip()), "the class word is empty: say what the subject is (dog, mug, toy...)")
        _require(
            1 <= len(self.photos) <= LIMITS.photos,
            f"give 1–{LIMITS.photos} photos of the subject (got {len(self.photos)})",
        )
        _require(
            self.preset in REGISTER_PRESETS,
            f"unknown preset '{self.preset}' (choose from {', '.join(REGISTER_PRESETS)})",
        )


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how. `source` is 'demo', a Hub id, a local diffusers folder or a .safetensors file."""

    source: str = "demo"
    family: str | None = None  # None: detected from the model's config
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    quantization: str = "none"
    offload: str = "none"
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "the model source is empty")
        for name, allowed in (
            ("family", FAMILIES + (None,)),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("offload", OFFLOADS),
        ):
            value = getattr(self, name)
            _require(value in allowed, f"unknown {name} '{value}' ({', '.join(a for a in allowed if a)})")
