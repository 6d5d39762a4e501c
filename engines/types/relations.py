"""Learned relations (DreamRelation) and LoRA files: how a relation is taught, what the library shows of one, and the
LoRAs a request applies. Torch-free, like every type the UI and the CLI share with the engines."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.checks import finite, require, whole

RELATION_NAME_RULE = "1–40 letters, digits, spaces, '_' or '-', starting with a letter or digit"
EXAMPLES_FILE = "relation.json"  # what a folder of a relation's examples holds beside its images
MIN_EXAMPLES, MAX_EXAMPLES = 3, 20  # a relation is taught from this many examples
MAX_KEYPOINTS = 32  # per object of an example
PAPER_KEYPOINT_WEIGHT = 0.1  # DreamRelation's λ for the keypoint matching loss (§4.1)
# the keypoint loss's weight per model family where the bench chose another than the paper's: on the demo world it
# lowered relation accuracy on both held-out scene sets (docs/relations.md); SD families keep the paper's
KEYPOINT_WEIGHTS: dict[str, float] = {"demo": 0.0}
KEYPOINT_SWITCHES: tuple[str, ...] = ("auto", "on", "off")  # auto: the family's weight; on: the paper's; off: none
LORA_SCALE_LIMIT = 4.0  # |scale| of one LoRA: far beyond what any LoRA is trained for, still not a typo's 1e6
MAX_LORAS = 8  # per request


def check_relation_name(name: str) -> str:
    """A relation's name is its folder in the library and what the picker shows: words, never a path."""
    ok = isinstance(name, str) and 1 <= len(name) <= 40 and name[0].isascii() and name[0].isalnum()
    ok = ok and all(c.isascii() and (c.isalnum() or c in " _-") for c in name)
    ok = ok and not name.endswith(" ") and "  " not in name
    require(ok, f"relation name {name!r} is not allowed: use {RELATION_NAME_RULE}")
    return name


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file (diffusers' or kohya's format, safetensors) applied at `scale` for one request."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        require(isinstance(self.path, str) and self.path.endswith(".safetensors"),
                f"LoRA {self.path!r}: Troupe reads LoRA weights from .safetensors files only")  # fmt: skip
        require(finite(self.scale) and abs(self.scale) <= LORA_SCALE_LIMIT,
                f"LoRA scale must be a number in -{LORA_SCALE_LIMIT:g}..{LORA_SCALE_LIMIT:g} (got {self.scale!r})")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> LoraRef:
        """'FILE[:SCALE]', as the CLI writes it."""
        path, sep, scale = text.rpartition(":")
        if not sep or path.endswith(":") or not scale.replace(".", "", 1).lstrip("-").isdigit():
            return cls(text)
        return cls(path, float(scale))


def keypoint_weight(family: str, switch: str = "auto") -> float | None:
    """The keypoint loss's weight a switch of KEYPOINT_SWITCHES asks for on a model family."""
    require(switch in KEYPOINT_SWITCHES, f"keypoints must be one of {', '.join(KEYPOINT_SWITCHES)} (got {switch!r})")
    if switch == "auto":
        return KEYPOINT_WEIGHTS.get(family, PAPER_KEYPOINT_WEIGHT)
    return PAPER_KEYPOINT_WEIGHT if switch == "on" else 0.0


@dataclass(frozen=True)
class RelationTrainRequest:
    """Teach a relation from a folder of examples (a relation.json beside its images)."""

    name: str
    exemplars: str  # the folder
    steps: int = 600  # with learning_rate: chosen on the demo world's relations (docs/relations.md)
    rank: int = 4
    keypoint_weight: float | None = None  # λ of the keypoint matching loss (Eq. 7); None: the family's; 0: off
    attention_weight: float = 0.001  # the cross-attention loss (background minus object attention)
    learning_rate: float = 2e-3
    batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_relation_name(self.name)
        require(isinstance(self.exemplars, str) and bool(self.exemplars), "name the folder of examples")
        require(whole(self.steps, 1, 10_000), "steps must be an integer in 1..10000")
        require(whole(self.rank, 1, 128), "rank must be an integer in 1..128")
        require(whole(self.batch, 1, 64), "batch must be an integer in 1..64")
        require(whole(self.seed, 0, 2**31 - 1), "seed must be an integer in 0..2^31-1")
        for what in ("keypoint_weight", "attention_weight"):
            value = getattr(self, what)
            ok = value is None and what == "keypoint_weight" or finite(value) and 0 <= value <= 100
            require(ok, f"{what.replace('_', ' ')} must be a number in 0..100")
        require(finite(self.learning_rate) and 0 < self.learning_rate <= 1, "learning rate must be in (0, 1]")


@dataclass(frozen=True)
class RelationInfo:
    """What the library shows of a learned relation (its LoRA stays a file)."""

    name: str
    relation: str  # the words ("leaning on")
    template: str  # "{a} leaning on {b}"
    boxes: tuple[tuple[float, float, float, float], ...]  # the examples' mean box per slot
    layers: tuple[int, ...]
    family: str
    fingerprint: str
    created: str
    steps: int
    rank: int
    keypoint_weight: float
    examples: int
    seconds: float
    lora: str  # path of the LoRA file
    loss_curve: tuple[float, ...] = ()
