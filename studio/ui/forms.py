"""Forms: where widgets become a request, in exactly one place per handler.

Each form is a frozen dataclass whose fields are named exactly as its API endpoint's parameters. The field order is
the order of the endpoint's inputs and of the widgets that "apply a request" fills, so no positional list of
widgets exists anywhere else: a tab keeps its widgets in a dict keyed by field name and asks the form for the
list (`widgets_in_order`). `form_handler` turns `fn(form, request)` into a Gradio handler whose signature names
every field, which is what Gradio reads to name the API parameters, so an API client can call by keyword:

    Client(url).predict(prompt="a red ball", canvas=canvas_json, api_name="/generate")

Parameters left out take the widgets' initial values (Gradio's API info carries them as defaults).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from PIL import Image, UnidentifiedImageError

from engines.types import (
    BOX_FITS,
    LIMITS,
    REFERENCE_SWITCHES,
    REGISTER_PRESETS,
    GenerateRequest,
    GuidanceConfig,
    InputError,
    ModelSpec,
    ReferenceConfig,
    RegisterRequest,
    RelationTrainRequest,
    check_relation_name,
    keypoint_weight,
    reference_switch,
)
from studio.ui.canvas import canvas_to_layout
from studio.ui.loras import lora_refs, lora_rows
from studio.ui.relation_examples import ExampleFolder, checked, parse_draft

FormT = TypeVar("FormT", bound="Form")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ASPECTS = (("4:3", 4, 3), ("3:4", 3, 4), ("3:2", 3, 2), ("2:3", 2, 3), ("16:9", 16, 9), ("9:16", 9, 16))


class Form:
    """What every form dataclass shares: its field names define the order of inputs and outputs."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_values(cls: type[FormT], values: Sequence[Any]) -> FormT:
        """The form from widget values in field order (how Gradio calls a handler)."""
        return cls(*values)

    @classmethod
    def widgets_in_order(cls, widgets: Mapping[str, Any]) -> list[Any]:
        """A tab's widgets (a dict keyed by field name) as the input/output list, in field order."""
        if set(widgets) != set(cls.names()):
            raise TypeError(f"{cls.__name__} widgets {sorted(widgets)} differ from its fields {cls.names()}")
        return [widgets[name] for name in cls.names()]

    def as_outputs(self, **updates: Any) -> tuple[Any, ...]:
        """The field values in field order (for outputs = widgets_in_order); `updates` replace some by name with a
        gr.update (new choices, say)."""
        unknown = set(updates) - set(self.names())
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        return tuple(updates.get(name, getattr(self, name)) for name in self.names())

    @classmethod
    def signature(cls) -> inspect.Signature:
        """`(request, <fields>...)`: gr.Request first (Gradio fills it in), then one named parameter per field."""
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        fields = [
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
            for f in dataclasses.fields(cls)
        ]  # type: ignore[arg-type]
        return inspect.Signature([request, *fields])


def form_handler(form: type[FormT], fn: Callable[[FormT, gr.Request], Any]) -> Callable[..., Any]:
    """A Gradio handler `(request, *values)` that calls `fn(form(*values), request)`.

    Gradio names API parameters after the handler's signature and fills `gr.Request` by its annotation, so the
    handler carries `form.signature()`; it keeps `fn`'s name (the ZeroGPU wrapper and the logs use it). A generator
    `fn` (a streaming job) gives a generator handler, which is how Gradio knows to stream.
    """
    if inspect.isgeneratorfunction(fn):

        def handler(request: gr.Request, *values: Any) -> Iterator[Any]:
            yield from fn(form.from_values(values), request)
    else:

        def handler(request: gr.Request, *values: Any) -> Any:  # type: ignore[misc]
            return fn(form.from_values(values), request)

    handler.__signature__ = form.signature()  # type: ignore[attr-defined]
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


# ------------------------------------------------------------------------------------------------ Compose
@dataclass(frozen=True)
class GenerateForm(Form):
    """The Compose tab's settings: the parameters of /generate and /save_project, the outputs of /open_png,
    /open_project and "Reuse settings". The defaults are the widgets' initial values."""

    prompt: str = ""
    negative_prompt: str = ""
    canvas: str = ""  # the canvas JSON (studio/ui/canvas.py)
    relation: str = ""  # a relation preset's name, or "" for none (recorded in the image's metadata)
    seed: float = 0
    random_seed: bool = True
    size: str = "native"  # "native" or "WxH"
    steps: int = GenerateRequest.steps
    cfg: float = GenerateRequest.cfg
    sampler: str = GenerateRequest.scheduler  # a key of engines.types.SCHEDULERS
    images: int = GenerateRequest.num_images
    layout_strength: float = GuidanceConfig.strength
    fit_boxes: str = "auto"  # "auto" (the model family's DEFAULT_BOX_FIT) or a key of BOX_FITS
    # the References group (studio/ui/references.py): the fields of ReferenceConfig, after the older parameters so
    # that positional API calls written before them keep working
    references: str = "auto"  # a key of engines.types.REFERENCE_SWITCHES
    reference_strength: float = ReferenceConfig.strength
    image_guidance: float = ReferenceConfig.image_guidance
    image_guidance_growth: float = ReferenceConfig.image_guidance_growth
    reference_adapter: bool = ReferenceConfig.adapter
    start: str = ReferenceConfig.start  # a value of engines.types.START_MODES
    start_strength: float = ReferenceConfig.start_strength
    # a learned relation's LoRA scale and the person's LoRA list (studio/ui/loras.py: rows of [file, scale])
    relation_scale: float = GenerateRequest.relation_scale
    loras: Any = None

    def to_request(self, class_words: Mapping[str, str]) -> GenerateRequest:
        """The one place where the Compose widgets become a GenerateRequest (checked by its constructor)."""
        width, height = parse_size(self.size)
        guidance = GuidanceConfig(strength=float(self.layout_strength))
        return GenerateRequest(
            prompt=self.prompt or "",
            negative_prompt=self.negative_prompt or "",
            layout=canvas_to_layout(self.canvas, class_words),
            relation=self.relation or None,
            relation_scale=_number(self.relation_scale, GenerateRequest.relation_scale),
            loras=lora_refs(self.loras),
            seed=None if self.random_seed else int(self.seed or 0),
            steps=int(self.steps),
            cfg=float(self.cfg),
            scheduler=self.sampler,
            width=width,
            height=height,
            num_images=int(self.images),
            guidance=guidance if self.fit_choice == "auto" else guidance.with_fit(self.fit_choice),
            references=self.reference_config(),
        )

    @property
    def fit_choice(self) -> str:
        """The box fitting asked for: "auto" (the studio picks by model family; Compose.generate) or a BOX_FITS key."""
        choice = self.fit_boxes or "auto"
        if choice != "auto" and choice not in BOX_FITS:
            raise InputError(f"fit_boxes must be one of auto, {', '.join(BOX_FITS)} (got {choice!r})")
        return choice

    def reference_config(self) -> ReferenceConfig:
        """The References group as a ReferenceConfig (which checks the ranges: an API call may send anything)."""
        switch = self.references or "auto"
        if switch not in REFERENCE_SWITCHES:
            raise InputError(f"references must be one of {', '.join(REFERENCE_SWITCHES)} (got {switch!r})")
        return ReferenceConfig(
            enabled=REFERENCE_SWITCHES[switch],
            strength=_number(self.reference_strength, ReferenceConfig.strength),
            adapter=bool(self.reference_adapter),
            image_guidance=_number(self.image_guidance, ReferenceConfig.image_guidance),
            image_guidance_growth=_number(self.image_guidance_growth, ReferenceConfig.image_guidance_growth),
            start=self.start or ReferenceConfig.start,
            start_strength=_number(self.start_strength, ReferenceConfig.start_strength),
        )

    @classmethod
    def from_request(cls, request: GenerateRequest, canvas_json: str, relations: Iterable[str]) -> GenerateForm:
        """A request (from a PNG or a project) back into the widgets; a relation this studio lacks is dropped."""
        sized = request.width is not None or request.height is not None
        return cls(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            canvas=canvas_json,
            relation=request.relation if request.relation in set(relations) else "",
            seed=request.seed if request.seed is not None else 0,
            random_seed=request.seed is None,
            size=f"{request.width}x{request.height}" if sized else "native",
            steps=request.steps,
            cfg=request.cfg,
            sampler=request.scheduler,
            images=request.num_images,
            layout_strength=request.guidance.strength,
            fit_boxes=request.guidance.fit_name or "full",  # the radio's nearest: settings of one's own always fit
            references=reference_switch(request.references.enabled),
            reference_strength=request.references.strength,
            image_guidance=request.references.image_guidance,
            image_guidance_growth=request.references.image_guidance_growth,
            reference_adapter=request.references.adapter,
            start=request.references.start,
            start_strength=request.references.start_strength,
            relation_scale=request.relation_scale,
            loras=lora_rows(request.loras),
        )


def _number(value: Any, default: float) -> float:
    """A slider's value; None (a keyword API call that left it out and has no widget default) takes the default."""
    return default if value is None else float(value)


def size_choices(native: int) -> list[tuple[str, str]]:
    """Size choices for a model: its native square, a few aspects of about the same area (multiples of 8), 2×."""
    choices = [(f"Native ({native}×{native})", "native")]
    for label, a, b in ASPECTS:
        width, height = native * (a / b) ** 0.5, native * (b / a) ** 0.5
        scale = max(1.0, 64 / min(width, height))
        width, height = (int(round(v * scale / 8) * 8) for v in (width, height))
        choices.append((f"{label} ({width}×{height})", f"{width}x{height}"))
    choices.append((f"2× ({2 * native}×{2 * native})", f"{2 * native}x{2 * native}"))
    return choices


def with_choice(choices: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
    """The choices plus `value` (a size from a PNG that the current model does not list)."""
    return choices if any(v == value for _, v in choices) else [*choices, (value.replace("x", "×"), value)]


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """ "native" → (None, None): the model's own size; "512x768" → (512, 768)."""
    if not value or value == "native":
        return None, None
    try:
        width, height = (int(v) for v in str(value).lower().replace("×", "x").split("x"))
    except ValueError as error:
        raise InputError(f"size must look like 512x768 (got {value!r})") from error
    return width, height


# ------------------------------------------------------------------------------------------------ Subjects
@dataclass(frozen=True)
class RegisterForm(Form):
    """The "New subject" card: the parameters of /register."""

    photos: Any = None  # a list of uploaded files (paths)
    name: str = ""
    class_word: str | None = None
    preset: str = "standard"  # a key of engines.types.REGISTER_PRESETS

    def to_request(self) -> RegisterRequest:
        """The one place where the registration widgets become a RegisterRequest (checked by its constructor)."""
        files = self.photos or []
        paths = [getattr(f, "name", f) for f in (files if isinstance(files, list) else [files])]
        return RegisterRequest(
            name=(self.name or "").strip(),
            class_word=(self.class_word or "").strip(),
            photos=check_photos(paths),
            preset=self.preset or "standard",
        )

    def gpu_seconds(self) -> float:
        """How long a Space may hold the GPU for this registration (the preset says)."""
        preset = REGISTER_PRESETS.get(self.preset or "", REGISTER_PRESETS["standard"])
        return preset.gpu_seconds


def check_photos(paths: list[str]) -> tuple[str, ...]:
    """Quick checks before any GPU work: something was dropped, and every file opens as an image."""
    if not paths:
        raise InputError(f"drop 1–{LIMITS.photos} photos of the subject first")
    for path in paths:
        name = Path(path).name
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"'{name}' is not an image: use PNG, JPEG or WebP photos")
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise InputError(f"'{name}' is not a readable image ({error.__class__.__name__})") from error
    return tuple(str(p) for p in paths)


# ------------------------------------------------------------------------------------------------ Relations
@dataclass(frozen=True)
class RelationForm(Form):
    """The "Teach a relation" card: the parameters of /teach_relation. `annotations` is the examples' JSON
    (studio/ui/relation_examples.py), `examples` the uploaded images (and, optionally, a ready relation.json)."""

    name: str = ""
    relation: str = ""  # the words: "leaning on"
    template: str = ""  # "{a} leaning on {b}"
    examples: Any = None
    annotations: str = "[]"
    steps: int = RelationTrainRequest.steps
    rank: int = RelationTrainRequest.rank
    keypoints: str = "auto"  # DreamRelation's keypoint matching loss: KEYPOINT_SWITCHES (auto: the family's choice)

    def to_request(self, folder_for: Callable[[str], Path]) -> tuple[RelationTrainRequest, ExampleFolder]:
        """The one place where the card's widgets become a RelationTrainRequest, and the examples it will read
        from the folder `folder_for(name)` gives (checked here; Train writes them there)."""
        name = check_relation_name((self.name or "").strip())  # a safe folder name before any path is built
        examples = checked(self.relation, self.template, self.examples, parse_draft(self.annotations))
        request = RelationTrainRequest(
            name=name,
            exemplars=str(folder_for(name)),
            steps=int(self.steps or RelationTrainRequest.steps),
            rank=int(self.rank or RelationTrainRequest.rank),
            keypoint_weight=None if self.keypoints == "auto" else keypoint_weight("", self.keypoints),
        )
        return request, examples

    def gpu_seconds(self) -> float:
        """How long a Space may hold the GPU for this training: loading and encoding, then the steps."""
        return min(600.0, 30.0 + 0.5 * float(self.steps or RelationTrainRequest.steps))


# ------------------------------------------------------------------------------------------------ Settings
@dataclass(frozen=True)
class ModelForm(Form):
    """The "Model & settings" fields: the parameters of /load_model; "request" here is a ModelSpec."""

    source: str = ModelSpec.source
    device: str = ModelSpec.device
    dtype: str = ModelSpec.dtype
    quantization: str = ModelSpec.quantization
    offload: str = ModelSpec.offload

    def to_request(self, started: ModelSpec | None = None) -> ModelSpec:
        """The one place where the settings widgets become a ModelSpec (checked by its constructor). The options the
        tab has no widget for (--vae, --embedding, --compile, --reference-adapter) come from `started`, the spec the
        studio runs now, so that switching models keeps what the app was started with."""
        started = started or ModelSpec()
        return ModelSpec(
            source=(self.source or "").strip(),
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            offload=self.offload,
            reference_adapter=started.reference_adapter,
            vae=started.vae,
            embeddings=started.embeddings,
            compile=started.compile,
        )

    @classmethod
    def from_request(cls, spec: ModelSpec) -> ModelForm:
        return cls(
            source=spec.source,
            device=spec.device,
            dtype=spec.dtype,
            quantization=spec.quantization,
            offload=spec.offload,
        )
