"""The demo world's customization dataset (SynCD §3 for a procedural world): one object, several scenes.

Every dataset object is one look (category, colour, pattern, second colour) rendered in `views` scenes at other
positions, sizes and backgrounds, half of them with one or two other objects behind it. Captions name the object by
its category alone, so the adapter trained on it (engines/reference_training.py) must take the look from the other
views. The bench's subjects are held out: the adapter never sees their looks in training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from demo_world.scenes import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    MAX_SIZE,
    SIZE,
    ObjectSpec,
    object_phrase,
    render_scene,
)
from engines.reference_dataset import DatasetWriter

SOURCE = "demo world"
MIN_OBJECT_SIZE = 18.0
PATTERNED_SHARE = 0.75  # most looks carry a pattern: the part of identity that words alone do not give
# Looks no training object may have: the bench's subjects (evals/subject_bench.py), so it measures unseen subjects.
HELD_OUT_LOOKS: tuple[ObjectSpec, ...] = (
    ObjectSpec("ball", "blue", "striped", "yellow"),
    ObjectSpec("box", "orange", "dotted", "cyan"),
    ObjectSpec("tent", "cyan", "striped", "red"),
)


def write_demo_dataset(root, objects: int, views: int = 3, seed: int = 0,
                       on_progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
    """Add objects to the dataset folder `root` until it holds `objects` (resuming one cut short); how many it
    holds. Object i depends only on (seed, i), so a resumed run writes what a single run would have."""
    writer = DatasetWriter(root, SOURCE, SIZE)
    for index in range(len(writer), objects):
        rng = np.random.default_rng([seed, index, 31])
        look = random_look(rng)
        scenes = [_view(look, rng) for _ in range(views)]
        images = [Image.fromarray(image) for image, _, _ in scenes]
        masks = [Image.fromarray(mask.astype(np.uint8) * 255) for _, mask, _ in scenes]
        writer.add(look.category, images, masks, [caption for _, _, caption in scenes])
        if on_progress is not None:
            on_progress(index + 1, objects)
    return len(writer)


def random_look(rng: np.random.Generator) -> ObjectSpec:
    """A look that is not held out."""
    colours = list(COLOURS)
    while True:
        category, colour = CATEGORIES[rng.integers(len(CATEGORIES))], colours[rng.integers(len(colours))]
        look = ObjectSpec(category, colour)
        if rng.random() < PATTERNED_SHARE:
            second = [c for c in colours if c != colour]
            pattern = ("striped", "dotted")[rng.integers(2)]
            look = ObjectSpec(category, colour, pattern, second[rng.integers(len(second))])
        if not any(_same_look(look, held) for held in HELD_OUT_LOOKS):
            return look


def _same_look(a: ObjectSpec, b: ObjectSpec) -> bool:
    return (a.category, a.colour, a.pattern, a.colour2) == (b.category, b.colour, b.pattern, b.colour2)


def _view(look: ObjectSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """One scene with the object in front: the image, the object's visible mask and a caption."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    others = [_random_other(rng) for _ in range(rng.choice([0, 0, 1, 2]))]
    size = float(rng.uniform(MIN_OBJECT_SIZE, MAX_SIZE))
    cx, cy = (float(rng.uniform(size / 2, SIZE - size / 2)) for _ in range(2))
    subject = ObjectSpec(look.category, look.colour, look.pattern, look.colour2, cx, cy, size)
    scene = render_scene([*others, subject], background, seed=int(rng.integers(2**31)), caption="")
    words = [("an " if look.category[0] in "aeiou" else "a ") + look.category]
    words += [object_phrase(other, rng) for other in others]
    caption = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if rng.random() < 0.7:
        phrases = BACKGROUND_PHRASES[background]
        caption += " " + phrases[rng.integers(len(phrases))]
    return scene.image, scene.objects[-1].mask, caption


def _random_other(rng: np.random.Generator) -> ObjectSpec:
    size = float(rng.uniform(MIN_OBJECT_SIZE, MAX_SIZE))
    look = random_look(rng)
    cx, cy = (float(rng.uniform(size / 2, SIZE - size / 2)) for _ in range(2))
    return ObjectSpec(look.category, look.colour, look.pattern, look.colour2, cx, cy, size)
