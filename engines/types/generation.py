"""What a generation asks for and gives back: regions and their layout, layout guidance and its modes, the request,
the result and the progress reported after each step. Validated when built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engines.types.checks import check_keys, finite, require, whole
from engines.types.references import ReferenceConfig
from engines.types.relations import LORA_SCALE_LIMIT, MAX_LORAS, LoraRef
from engines.types.tables import LIMITS, SCHEDULERS

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the canvas


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
        require(bool(self.phrase.strip()) or self.subject is not None, "a region needs a phrase or a subject")
        require(len(self.box) == 4, f"region '{label}': a box has four numbers x0,y0,x1,y1")
        x0, y0, x1, y1 = self.box
        require(
            all(finite(v) and 0.0 <= v <= 1.0 for v in self.box),
            f"region '{label}': box {self.box} must lie inside the canvas (every number in [0, 1])",
        )
        require(x1 > x0 and y1 > y0, f"region '{label}': box {self.box} has zero area (need x0 < x1 and y0 < y1)")
        require(isinstance(self.layer, int) and self.layer >= 0, f"region '{label}': layer must be an integer ≥ 0")

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
    backward guidance). It costs a UNet forward and backward per iteration; BOX_FITS names the settings people choose
    from, and DEFAULT_BOX_FIT which one the studio uses per model family when boxes are drawn.
    """

    FIT_ITERATIONS = 3  # box fitting when switched on (docs/layout.md: the demo bench's best trade)
    # full: every cross-attention layer; coarse: the down and middle blocks' only — the UNet's forward stops after its
    # middle block, so a fitting iteration costs about half; down: the down blocks' only; crowd: down for one or two
    # regions, coarse for more (docs/layout.md)
    FIT_DEPTHS = ("full", "coarse", "down", "crowd")
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
    fit_depth: str = "full"  # FIT_DEPTHS: which cross-attention layers the energy reads (the UNet runs that far)

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
            require(finite(getattr(self, name)), f"guidance {name} must be a finite number")
        require(self.strength >= 0, "guidance strength must be ≥ 0")
        require(0.0 <= self.guided_fraction <= 1.0, "guided fraction must be in [0, 1]")
        require(
            type(self.fit_iterations) is int and 0 <= self.fit_iterations <= self.MAX_FIT_ITERATIONS,
            f"box-fitting iterations must be an integer in 0..{self.MAX_FIT_ITERATIONS}",
        )
        require(0.0 <= self.fit_fraction <= 1.0, "box-fitting fraction must be in [0, 1]")
        require(self.fit_scale >= 0, "box-fitting scale must be ≥ 0")
        require(self.fit_depth in self.FIT_DEPTHS, f"box-fitting depth must be one of {', '.join(self.FIT_DEPTHS)}")

    @classmethod
    def cones2_public(cls) -> GuidanceConfig:
        """Exactly the public Cones 2 code: the subject's tokens are masked out everywhere but its region."""
        return cls(strength=0.08, inside_weight=2.5, other_region_weight=-1e8, background_weight=-1e8)

    @classmethod
    def off(cls) -> GuidanceConfig:
        return cls(strength=0.0)

    def fitted(self, iterations: int | None = None) -> GuidanceConfig:
        """The same guidance with full box fitting on (`--fit-boxes`), or with `iterations` of it."""
        return dataclasses.replace(self, fit_iterations=self.FIT_ITERATIONS if iterations is None else iterations)

    def with_fit(self, name: str) -> GuidanceConfig:
        """The same guidance with the box fitting BOX_FITS[name]."""
        require(name in BOX_FITS, f"unknown box fitting {name!r} (choose from {', '.join(BOX_FITS)})")
        fit = BOX_FITS[name]
        return dataclasses.replace(
            self, fit_iterations=fit.iterations, fit_depth=fit.depth, fit_scale=fit.scale, fit_fraction=fit.fraction
        )

    @property
    def fit_name(self) -> str | None:
        """The BOX_FITS entry these settings are (None: settings of one's own, e.g. from an older image)."""
        if self.fit_iterations == 0:
            return "off"
        return next((name for name in BOX_FITS if self.with_fit(name) == self), None)


@dataclass(frozen=True)
class BoxFit:
    """A box-fitting setting people choose by name: the GuidanceConfig fields it sets."""

    title: str
    iterations: int
    depth: str = "full"
    scale: float = 30.0
    fraction: float = 0.5
    about: str = ""


BOX_FITS: dict[str, BoxFit] = {
    "off": BoxFit("Off", 0, about="forward guidance only: objects land in their boxes, often larger than drawn"),
    "quick": BoxFit(
        "Quick",
        3,
        "crowd",
        60.0,
        0.35,
        "fits on the coarse layers in the first 35% of the steps: ~1.4x the time of an image without boxes, "
        "~1.6x with 3 or more",
    ),
    "full": BoxFit("Full", 3, about="fits on every layer in the first half of the steps: ~4x the time"),
}
# What a person who draws boxes and chooses nothing gets, per model family (docs/layout.md, "The default path"): on the
# demo model quick fitting was chosen on the bench and confirmed on held-out and fresh layouts. Stable Diffusion keeps
# Cones 2's forward guidance (the paper's method) until fitting is measured there: it needs a backward pass through an
# 860M-2.6B UNet with its activations kept, which the quantized and offloaded presets cannot afford.
DEFAULT_BOX_FIT: dict[str, str] = {"demo": "quick", "sd15": "off", "sd2": "off", "sdxl": "off"}


def with_default_fit(guidance: GuidanceConfig, layout: Layout, family: str) -> GuidanceConfig:
    """What "fitting: auto" means: the family's DEFAULT_BOX_FIT when boxes are drawn and guided and no fitting was
    chosen; `guidance` unchanged otherwise (no boxes, guidance off, or fitting already set)."""
    if not layout.regions or guidance.strength == 0 or guidance.fit_iterations > 0:
        return guidance
    return guidance.with_fit(DEFAULT_BOX_FIT.get(family, "off"))


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
    "troupe": GuidanceMode(
        "Troupe forward guidance",
        GuidanceConfig(),
        "Troupe's layout guidance (Cones 2 Eq. 7 with the layer order); --fit adds box fitting to it",
    ),
    "troupe-fitted": GuidanceMode(
        "Troupe + box fitting",
        GuidanceConfig().with_fit("full"),
        "forward guidance plus box fitting: objects drawn at their boxes' size (~4x the time)",
    ),
    "troupe-quick-fit": GuidanceMode(
        "Troupe + quick box fitting",
        GuidanceConfig().with_fit("quick"),
        "box fitting on the coarse layers only, in the first 35% of the steps (~1.4x the time; ~1.6x with 3+ boxes)",
    ),
}
GUIDANCE_ALIASES = {"none": "off", "cones2-public": "cones2"}  # the names the bench used before the CLI's


def guidance_mode(name: str, what: str = "guidance mode") -> GuidanceMode:
    """A mode of GUIDANCE_MODES by its name or an older alias."""
    key = GUIDANCE_ALIASES.get(name, name)
    require(key in GUIDANCE_MODES, f"unknown {what} {name} (choose from {', '.join(GUIDANCE_MODES)})")
    return GUIDANCE_MODES[key]


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    layout: Layout = field(default_factory=Layout)
    relation: str | None = None  # a relation of the picker; a learned one applies its LoRA at relation_scale
    relation_scale: float = 1.0
    loras: tuple[LoraRef, ...] = ()  # the person's own LoRA files, each at its scale
    seed: int | None = None  # None: a random seed, reported in the result
    steps: int = 20
    cfg: float = 7.5
    scheduler: str = "default"
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    references: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt", "scheduler"):  # a job line or project may hold anything
            require(isinstance(getattr(self, name), str), f"{name} must be text")
        require(bool(self.prompt.strip()), "the prompt is empty: describe the picture first")
        require(whole(self.steps, 1, LIMITS.steps), f"steps must be an integer in 1..{LIMITS.steps}")
        require(finite(self.cfg) and 0.0 <= self.cfg <= LIMITS.cfg, f"CFG must be a number in 0..{LIMITS.cfg:g}")
        require(
            self.scheduler in SCHEDULERS, f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULERS)})"
        )
        require(whole(self.num_images, 1, LIMITS.images), f"number of images must be 1..{LIMITS.images}")
        last = 2**63 - self.num_images  # image k uses seed + k, and torch's generator takes at most 2⁶³−1
        require(
            self.seed is None or whole(self.seed, 0, last),
            f"seed must be an integer in 0..{last}: image k of {self.num_images} uses seed + k, at most 2⁶³−1",
        )
        require(self.relation is None or isinstance(self.relation, str), "relation must be a name or null")
        require(finite(self.relation_scale) and abs(self.relation_scale) <= LORA_SCALE_LIMIT,
                f"relation scale must be a number in -{LORA_SCALE_LIMIT:g}..{LORA_SCALE_LIMIT:g}")  # fmt: skip
        require(len(self.loras) <= MAX_LORAS, f"at most {MAX_LORAS} LoRAs per request")
        require(all(isinstance(lora, LoraRef) for lora in self.loras), "loras must be LoraRef objects")
        for name in ("width", "height"):
            size = getattr(self, name)
            require(
                size is None or (whole(size, LIMITS.min_side, LIMITS.max_side) and size % 8 == 0),
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
            require(isinstance(region["box"], (list, tuple)), "a region's box must be a list of four numbers")
            regions.append(Region(**{**region, "box": tuple(region["box"])}))
        guidance = GuidanceConfig(**_fields_of(GuidanceConfig, data.pop("guidance", None) or {}))
        references = ReferenceConfig(**_fields_of(ReferenceConfig, data.pop("references", None) or {}))
        loras = data.pop("loras", None) or ()
        require(isinstance(loras, (list, tuple)), "loras must be a list")
        loras = tuple(LoraRef(**_fields_of(LoraRef, lora, required=("path",))) for lora in loras)
        layout = Layout(tuple(regions))
        return cls(**data, layout=layout, guidance=guidance, references=references, loras=loras)


def _fields_of(kind: type, data: Any, required: Iterable[str] = ()) -> dict[str, Any]:
    return check_keys(data, kind.__name__, [f.name for f in dataclasses.fields(kind)], required)


@dataclass(frozen=True)
class GenerateResult:
    images: tuple[Any, ...]  # PIL.Image.Image, each carrying its metadata in `.info`
    seeds: tuple[int, ...]
    request: GenerateRequest
    metadata: tuple[dict[str, str], ...]  # the PNG text chunks of each image
    timings: dict[str, float]
    warnings: tuple[str, ...] = ()  # what the person should know (a subject's photos are gone, say)


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
