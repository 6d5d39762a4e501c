"""Frozen dataclasses shared by the UI, the CLI and the engines.

Nothing here imports torch: these objects cross the boundary between `studio/` and `engines/`, are written into
PNG metadata and project files as JSON, and are validated once, when they are built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the canvas
Family = Literal["sd15", "sd2", "sdxl", "demo"]
FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "demo")
SCHEDULERS: tuple[str, ...] = ("default", "ddim", "euler", "euler_a", "dpmpp_2m", "lms", "pndm")


class InputError(ValueError):
    """Bad input from a person (a box outside the canvas, an unknown subject...): shown as one readable line."""


FIT_ITERATIONS = 3  # box fitting when switched on: the demo bench's best trade of fit against time
MAX_FIT_ITERATIONS = 10


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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
        _require(all(_finite(v) and 0.0 <= v <= 1.0 for v in self.box),
                 f"region '{label}': box {self.box} must lie inside the canvas (every number in [0, 1])")
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
        for name in ("strength", "inside_weight", "other_region_weight", "background_weight", "guided_fraction",
                     "fit_fraction", "fit_scale"):
            _require(_finite(getattr(self, name)), f"guidance {name} must be a finite number")
        _require(self.strength >= 0, "guidance strength must be ≥ 0")
        _require(0.0 <= self.guided_fraction <= 1.0, "guided fraction must be in [0, 1]")
        _require(type(self.fit_iterations) is int and 0 <= self.fit_iterations <= MAX_FIT_ITERATIONS,
                 f"box-fitting iterations must be an integer in 0..{MAX_FIT_ITERATIONS}")
        _require(0.0 <= self.fit_fraction <= 1.0, "box-fitting fraction must be in [0, 1]")
        _require(self.fit_scale >= 0, "box-fitting scale must be ≥ 0")

    @classmethod
    def cones2_public(cls) -> GuidanceConfig:
        """Exactly the public Cones 2 code: the subject's tokens are masked out everywhere but its region."""
        return cls(strength=0.08, inside_weight=2.5, other_region_weight=-1e8, background_weight=-1e8)

    @classmethod
    def off(cls) -> GuidanceConfig:
        return cls(strength=0.0)

    def fitted(self, iterations: int = FIT_ITERATIONS) -> GuidanceConfig:
        """The same guidance with box fitting on (the UI's "Fit objects to their boxes")."""
        return dataclasses.replace(self, fit_iterations=iterations)


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
        _require(isinstance(self.steps, int) and 1 <= self.steps <= 500, "steps must be an integer in 1..500")
        _require(_finite(self.cfg) and 0.0 <= self.cfg <= 50.0, "CFG must be a number in 0..50")
        _require(self.scheduler in SCHEDULERS, f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULERS)})")
        _require(isinstance(self.num_images, int) and 1 <= self.num_images <= 16, "number of images must be 1..16")
        _require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed must be an integer ≥ 0")
        for name in ("width", "height"):
            size = getattr(self, name)
            _require(size is None or (isinstance(size, int) and 64 <= size <= 4096 and size % 8 == 0),
                     f"{name} must be a multiple of 8 between 64 and 4096")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateRequest:
        """Inverse of `to_dict`; unknown keys are an error, so a typo never silently changes a picture."""
        data = dict(data)
        _reject_unknown(cls, data)
        layout = data.pop("layout", None) or {}
        _reject_unknown(Layout, layout)
        regions = []
        for region in layout.get("regions", ()):
            _reject_unknown(Region, region)
            regions.append(Region(**{**region, "box": tuple(region["box"])}))
        guidance = data.pop("guidance", None) or {}
        _reject_unknown(GuidanceConfig, guidance)
        return cls(**data, layout=Layout(tuple(regions)), guidance=GuidanceConfig(**guidance))


def _reject_unknown(kind: type, data: dict[str, Any]) -> None:
    _require(isinstance(data, dict), f"{kind.__name__} must be a JSON object")
    unknown = set(data) - {f.name for f in dataclasses.fields(kind)}
    _require(not unknown, f"unknown {kind.__name__} keys: {', '.join(sorted(unknown))}")


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


class Cancelled(Exception):
    """The person pressed cancel; whatever was running stopped between two steps and changed nothing."""


SUBJECT_NAME_RULE = "1–40 letters, digits, '_' or '-', starting with a letter or digit"
PRESETS: tuple[str, ...] = ("quick", "standard", "thorough")


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
        _require(1 <= len(self.photos) <= 10, f"give 1–10 photos of the subject (got {len(self.photos)})")
        _require(self.preset in PRESETS, f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")


QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")
OFFLOADS: tuple[str, ...] = ("none", "model", "sequential")
DTYPES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")


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
        _require(self.family is None or self.family in FAMILIES, f"unknown family '{self.family}' ({', '.join(FAMILIES)})")
        _require(self.dtype in DTYPES, f"unknown dtype '{self.dtype}' ({', '.join(DTYPES)})")
        _require(self.quantization in QUANTIZATIONS, f"unknown quantization '{self.quantization}' ({', '.join(QUANTIZATIONS)})")
        _require(self.offload in OFFLOADS, f"unknown offload '{self.offload}' ({', '.join(OFFLOADS)})")
