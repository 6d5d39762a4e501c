"""SynCD's dataset recipe for Stable Diffusion models (SynCD §3.2, "deformable objects", and Appendix C.1).

For each object — a class word, taken in turn from a list — V views are generated *jointly*, as one batch, with the
prompts "a photo of a {class} {background}" (one background phrase per view, all different): every self-attention
layer lets each view attend to the other views' tokens too (masked shared attention, Eq. 1;
kernels/shared_attention.py). For the first denoising step a view sees all of the others; from then on only their
foreground, re-estimated after every step from the class word's cross-attention. The object's masks are the same
estimate at the end: the class word's attention averaged over layers and steps, upsampled to the image, split by
Otsu's threshold and dilated 3×3 (engines/foreground_masks.py). An object whose mask is empty in some view, or covers
more than 90 % of it, is skipped (the model did not separate it from the scene; SynCD filters its data too, §3.2,
with DINOv2 and aesthetics scores, which Troupe leaves out).

Object i depends only on (seed, i), so a run that stops and is started again writes what one run would have. What a
run has tried — skipped objects leave no image behind — is kept beside the dataset in `synthesis.json`, with the
recipe; continuing with another recipe is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engines.foreground_masks import foreground_masks, mask_problem
from engines.reference_dataset import DatasetWriter
from engines.types import Cancelled, InputError
from kernels.shared_attention import SharedAttentionState, install_shared_attention

PROGRESS_FILE = "synthesis.json"
MAX_SKIPS_IN_A_ROW = 25  # a model that never separates objects from scenes would otherwise loop for ever
# SynCD's negative prompt (Appendix C.1): keeps the views photographic
NEGATIVE_PROMPT = "3d render, low resolution, blurry, cartoon"
# Common things people customise: pets, toys, things on a desk or in a kitchen, things to wear (SynCD samples pets
# and Objaverse's everyday categories; its categories.txt is not copied here).
DEFAULT_CLASSES = (
    "dog", "cat", "rabbit", "hamster", "parrot", "teddy bear", "rubber duck", "toy car", "robot toy", "plush toy",
    "mug", "teapot", "vase", "bowl", "water bottle", "backpack", "handbag", "suitcase", "sneaker", "boot",
    "hat", "sunglasses", "watch", "guitar", "lamp", "chair", "clock", "candle", "potted plant", "basket",
    "bicycle", "skateboard", "helmet", "camera", "headphones", "book", "pillow", "toy train", "doll", "ball",
)  # fmt: skip
# Scenes to put the object in; each view of one object gets a different one, so backgrounds vary and the object stays.
BACKGROUNDS = (
    "on a wooden table", "on a sandy beach", "in a green garden", "on a city street", "in a cosy living room",
    "on the grass in a park", "in the snow", "on a kitchen counter", "in front of a brick wall", "in a forest",
    "on a rocky mountain path", "by a lake at sunset", "on a bookshelf", "on a picnic blanket", "in a cafe",
)  # fmt: skip


@dataclass(frozen=True)
class SynthesisSettings:
    objects: int = 1000  # objects the dataset should hold in the end (skipped ones do not count)
    views: int = 3
    steps: int = 50  # SynCD's dataset script samples 50 steps
    guidance: float = 7.5
    size: int | None = None  # the images' side; None: the model's native size
    seed: int = 0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    shared: bool = True  # False generates every view alone: only to measure what sharing does
    max_coverage: float = 0.9  # a mask over more of its image than this is not an object

    def recipe(self) -> dict:
        """Everything that decides what object i looks like: a resumed run must use the same."""
        recipe = asdict(self)
        del recipe["objects"]
        recipe["classes"] = list(self.classes)
        return recipe


@dataclass(frozen=True)
class SynthesisProgress:
    written: int  # objects in the dataset
    target: int
    attempts: int  # objects tried, written or skipped
    skipped: int
    class_word: str  # the object being generated (or just finished)
    step: int  # denoising step of that object, 1-based; 0 when the report is about a finished object
    steps: int
    elapsed: float  # seconds since this run started
    note: str = ""  # what happened to the object just finished: "wrote ..." or "skipped ...: why"


@dataclass(frozen=True)
class ObjectViews:
    class_word: str
    images: tuple[Image.Image, ...]  # RGB
    masks: tuple[Image.Image, ...]  # L, 255 = the object
    captions: tuple[str, ...]
    problem: str | None  # why the object should be skipped, or None


def read_class_file(path: str | Path) -> tuple[str, ...]:
    """Class words, one a line (blank lines and # comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class list {path} does not exist")
    words = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    words = [" ".join(word.split()) for word in words if word]
    if not words:
        raise InputError(f"class list {path} names no class words")
    return tuple(words)


def caption(class_word: str, background: str) -> str:
    return f"{_lead(class_word)} {class_word} {background}"


def _lead(class_word: str) -> str:
    return "a photo of an" if class_word[0].lower() in "aeiou" else "a photo of a"


def class_positions(tokenizer, class_word: str) -> tuple[int, ...]:
    """The class word's token positions in every caption of it: the captions share their beginning, and CLIP's BPE
    splits at spaces, so what follows the class word does not change its tokens."""
    before = len(tokenizer(_lead(class_word)).input_ids) - 1  # BOS and the lead; EOS dropped
    through = len(tokenizer(f"{_lead(class_word)} {class_word}").input_ids) - 1
    return tuple(range(before, through))


def check_settings(bundle, settings: SynthesisSettings) -> int:
    """Refuse a recipe that cannot make a dataset, before anything is written; the images' side."""
    if bundle.family not in ("sd15", "sd2", "sdxl", "demo"):
        raise InputError(f"the dataset recipe runs on SD 1.5, SD 2.x and SDXL models, not {bundle.family}")
    if settings.views < 2:
        raise InputError(f"an object needs at least 2 views (got {settings.views}): the views teach each other")
    if settings.views > len(BACKGROUNDS):
        raise InputError(f"at most {len(BACKGROUNDS)} views: each view gets its own background")
    if not settings.classes or not all(isinstance(c, str) and c.strip() for c in settings.classes):
        raise InputError("the class list is empty (or holds an empty class word)")
    if settings.objects < 1 or settings.steps < 1:
        raise InputError("the dataset needs at least 1 object and 1 denoising step")
    if not 0 <= settings.max_coverage <= 1:
        raise InputError(f"max coverage must lie in [0, 1] (got {settings.max_coverage})")
    unet = bundle.pipe.unet
    multiple = bundle.pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    size = settings.size or bundle.native_size
    if size < multiple or size % multiple:
        raise InputError(f"image size {size} must be a positive multiple of {multiple} for this model")
    for word in settings.classes:
        if max(class_positions(bundle.pipe.tokenizer, word)) >= bundle.pipe.tokenizer.model_max_length - 1:
            raise InputError(f"class word '{word[:40]}' is too long for the text encoder")
    return size


def object_plan(settings: SynthesisSettings, attempt: int) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """Object `attempt`'s class word, background phrases and per-view noise seeds: from (seed, attempt) alone."""
    rng = np.random.default_rng([settings.seed, attempt, 17])
    backgrounds = tuple(BACKGROUNDS[i] for i in rng.choice(len(BACKGROUNDS), settings.views, replace=False))
    seeds = tuple(int(s) for s in rng.integers(0, 2**31 - 1, settings.views))
    return settings.classes[attempt % len(settings.classes)], backgrounds, seeds


@torch.no_grad()
def generate_views(bundle, class_word: str, backgrounds: Sequence[str], seeds: Sequence[int],
                   settings: SynthesisSettings, on_step: Callable[[int], None] | None = None,
                   ) -> ObjectViews:  # fmt: skip
    """The views of one object, generated together with shared attention, with their masks."""
    pipe = bundle.pipe
    size = settings.size or bundle.native_size
    captions = tuple(caption(class_word, background) for background in backgrounds)
    latent = size // pipe.vae_scale_factor
    state = SharedAttentionState(len(captions), (latent, latent), class_positions(pipe.tokenizer, class_word),
                                 shared=settings.shared)  # fmt: skip

    def step_end(_pipe, step: int, _timestep, _tensors: dict) -> dict:
        # from the second step on, the other views give only their foreground, as estimated so far (App. C.1)
        state.set_foreground(foreground_masks(state.mean_map(), state.latent_size))  # (V, h, w)
        if on_step is not None:
            on_step(step + 1)
        return {}

    previous = install_shared_attention(pipe.unet, state)
    try:
        images = pipe(
            prompt=list(captions),
            negative_prompt=[NEGATIVE_PROMPT] * len(captions),
            height=size,
            width=size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=step_end,
        ).images
    finally:
        pipe.unet.set_attn_processor(previous)
    masks = foreground_masks(state.mean_map(), (size, size)).cpu()  # (V, S, S) bool
    mask_images = tuple(Image.fromarray(mask.numpy().astype(np.uint8) * 255) for mask in masks)
    return ObjectViews(class_word, tuple(images), mask_images, captions, mask_problem(masks, settings.max_coverage))


class _Ledger:
    """synthesis.json: the recipe and how many objects were tried, written after every object."""

    def __init__(self, root: Path, settings: SynthesisSettings, written: int) -> None:
        self.path, self.recipe = root / PROGRESS_FILE, settings.recipe()
        self.attempts, self.skipped = 0, []
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data["recipe"] != self.recipe:
                changed = sorted(k for k in self.recipe if data["recipe"].get(k) != self.recipe[k])
                raise InputError(f"{root} was made with another recipe ({', '.join(changed)} differ): "
                                 "use the same settings to continue it, or another folder")  # fmt: skip
            # objects written after the ledger's last save (a run stopped between the two writes) were tried too
            self.attempts = data["attempts"] + written - data["written"]
            self.skipped = data["skipped"]
        elif written:
            raise InputError(f"{root} holds a dataset this recipe did not write: choose another folder")

    def save(self, written: int) -> None:
        data = {"recipe": self.recipe, "attempts": self.attempts, "written": written, "skipped": self.skipped}
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a run whose first objects were skipped
        partial = self.path.with_name(PROGRESS_FILE + ".partial")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.path)


def synthesize_dataset(bundle, out: str | Path, settings: SynthesisSettings,
                       on_progress: Callable[[SynthesisProgress], None] | None = None, cancel=None) -> int:  # fmt: skip
    """Add objects to the dataset folder `out` until it holds `settings.objects` (continuing a run that stopped);
    how many it holds. `cancel` (a threading.Event) stops between two denoising steps: Cancelled, with every
    finished object kept."""
    size = check_settings(bundle, settings)
    root = Path(out)
    writer = DatasetWriter(root, bundle.spec.source, size)
    ledger = _Ledger(root, settings, len(writer))
    started, in_a_row = time.perf_counter(), 0

    def report(class_word: str, step: int, note: str = "") -> None:
        """Tell, then stop if asked to: a cancel between two steps drops only the object in flight."""
        if on_progress is not None:
            elapsed = time.perf_counter() - started
            on_progress(SynthesisProgress(len(writer), settings.objects, ledger.attempts, len(ledger.skipped),
                                          class_word, step, settings.steps, elapsed, note))  # fmt: skip
        if cancel is not None and cancel.is_set():
            raise Cancelled()

    while len(writer) < settings.objects:
        class_word, backgrounds, seeds = object_plan(settings, ledger.attempts)
        report(class_word, 0)
        views = generate_views(bundle, class_word, backgrounds, seeds, settings, partial(report, class_word))
        if views.problem is None:
            writer.add(class_word, views.images, views.masks, views.captions)
            note, in_a_row = f"wrote {class_word}", 0
        else:
            ledger.skipped.append([ledger.attempts, class_word, views.problem])
            note, in_a_row = f"skipped {class_word}: {views.problem}", in_a_row + 1
        ledger.attempts += 1
        ledger.save(len(writer))
        report(class_word, 0, note)
        if in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise InputError(f"the last {in_a_row} objects were all skipped (their masks were empty or too big): "
                             "this model's cross-attention does not find the objects")  # fmt: skip
    return len(writer)
