"""A relation's examples: a folder with a relation.json and its images, read and checked before any work.

    {"relation": "leaning on", "template": "{a} leaning on {b}", "layers": [1, 0], "mirror": true,   (both optional)
     "examples": [{"image": "01.png", "prompt": "a red box leaning on a blue tent on grass",
                   "objects": [{"phrase": "red box", "box": [0.1, 0.3, 0.5, 0.9],
                                "mask": "01_a.png", "keypoints": [[0.2, 0.4], [0.3, 0.8]]},   (both optional)
                               {"phrase": "blue tent", "box": [0.45, 0.35, 0.95, 0.95]}]}]}

objects[0] fills slot {a}, objects[1] slot {b}; every phrase is words of its prompt (the cross-attention loss reads
their tokens). An object without a mask gets one from the same foreground step as a subject's photos
(engines/images.py: the ONNX segmenter or GrabCut), run on its box; one without keypoints gets them from its mask.
`mirror` says the relation is the same seen in a mirror (leaning on, hugging — not "to the left of"): training then
also sees every example flipped left to right, twice the examples for free. Every problem is one InputError naming
the example and the key; nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engines.images import find_segmenter, grabcut_mask, load_photo
from engines.relations.presets import Relation
from engines.types import EXAMPLES_FILE, MAX_EXAMPLES, MAX_KEYPOINTS, MIN_EXAMPLES, Box, InputError, Region, check_keys

BOX_MARGIN = 0.15  # of the box's side, added around it before finding the foreground in it
_TOP_KEYS, _EXAMPLE_KEYS = {"relation", "template", "examples", "layers", "mirror"}, {"image", "prompt", "objects"}
_OBJECT_KEYS = {"phrase", "box", "mask", "keypoints"}


@dataclass(frozen=True)
class ExampleObject:
    phrase: str
    box: Box  # (x0, y0, x1, y1) in [0, 1]
    mask: np.ndarray  # (H, W) float32 in [0, 1] at the image's size
    keypoints: tuple[tuple[float, float], ...]  # (x, y) in [0, 1]


@dataclass(frozen=True)
class RelationExample:
    image: Image.Image  # RGB
    prompt: str
    objects: tuple[ExampleObject, ExampleObject]  # slot a, slot b
    source: str  # the image's file name


@dataclass(frozen=True)
class RelationExamples:
    words: str  # the relation in words ("leaning on")
    relation: Relation  # the template, the examples' mean boxes and the layers: what the picker proposes
    examples: tuple[RelationExample, ...]
    digest: str  # of relation.json and every file it names: a resumed training must see the same examples
    mirror: bool = False  # train on every example flipped left to right too


def read_examples(folder: str | Path, name: str | None = None) -> RelationExamples:
    """The examples in `folder`, validated (every image fully decoded) before anything else happens."""
    folder = Path(folder).expanduser()
    if not (folder / EXAMPLES_FILE).is_file():
        raise InputError(f"{folder}: no {EXAMPLES_FILE} in it (see the README's 'Teach a relation')")
    try:
        data = json.loads((folder / EXAMPLES_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise InputError(f"{EXAMPLES_FILE}: not valid JSON ({error})") from None
    check_keys(data, EXAMPLES_FILE, _TOP_KEYS, {"relation", "template", "examples"})
    words = data["relation"]
    if not isinstance(words, str) or not words.strip():
        raise InputError(f"{EXAMPLES_FILE}: 'relation' must name the relation in words (\"leaning on\")")
    entries = data["examples"]
    if not isinstance(entries, list) or not MIN_EXAMPLES <= len(entries) <= MAX_EXAMPLES:
        count = len(entries) if isinstance(entries, list) else "no list of"
        raise InputError(f"{EXAMPLES_FILE}: a relation is taught from {MIN_EXAMPLES}–{MAX_EXAMPLES} examples "
                         f"(found {count})")  # fmt: skip
    digest = hashlib.sha256((folder / EXAMPLES_FILE).read_bytes())
    examples = tuple(_example(folder, entry, index, digest) for index, entry in enumerate(entries))
    relation = Relation(
        name=name or " ".join(words.split()),
        template=data["template"],
        arity=2,
        boxes=[_mean_box([e.objects[slot].box for e in examples]) for slot in (0, 1)],
        layers=data.get("layers", [1, 0]),
        kind="interaction",
    )
    if not isinstance(data.get("mirror", False), bool):
        raise InputError(f"{EXAMPLES_FILE}: mirror must be true or false")
    return RelationExamples(" ".join(words.split()), relation, examples, digest.hexdigest(), data.get("mirror", False))


def _example(folder: Path, entry: Any, index: int, digest) -> RelationExample:
    where = f"{EXAMPLES_FILE}: example {index + 1}"
    check_keys(entry, where, _EXAMPLE_KEYS, _EXAMPLE_KEYS)
    path = _inside(folder, entry["image"], where, "image")
    where = f"example {path.name}"
    image = load_photo(path)
    digest.update(path.read_bytes())
    prompt = entry["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: the prompt is empty")
    objects = entry["objects"]
    if not isinstance(objects, list) or len(objects) != 2:
        count = len(objects) if isinstance(objects, list) else 0
        raise InputError(f"{where}: needs exactly 2 objects (slot a, then slot b); found {count}")
    parts = tuple(_object(folder, image, prompt, item, f"{where}, object {slot}", digest)
                  for slot, item in zip("ab", objects))  # fmt: skip
    return RelationExample(image, " ".join(prompt.split()), parts, path.name)


def _object(folder: Path, image: Image.Image, prompt: str, item: Any, where: str, digest) -> ExampleObject:
    check_keys(item, where, _OBJECT_KEYS, {"phrase", "box"})
    phrase = item["phrase"]
    if not isinstance(phrase, str) or not phrase.strip() or " ".join(phrase.split()) not in " ".join(prompt.split()):
        raise InputError(f"{where}: the phrase {phrase!r} must be words of the example's prompt")
    box = item["box"]
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise InputError(f"{where}: box must be four numbers x0, y0, x1, y1 in [0, 1]")
    try:
        box = Region(phrase=phrase, box=tuple(float(v) for v in box)).box  # the canvas's own box checks
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    if "mask" in item:
        path = _inside(folder, item["mask"], where, "mask")
        digest.update(path.read_bytes())
        mask = np.asarray(load_photo(path).convert("L").resize(image.size, Image.BILINEAR), np.float32) / 255.0
    else:
        mask = box_foreground(image, box)
    if (mask > 0.5).sum() == 0:
        raise InputError(f"{where}: its mask is empty")
    points = _keypoints(item["keypoints"], where) if "keypoints" in item else mask_keypoints(mask)
    return ExampleObject(" ".join(phrase.split()), box, mask, points)


def _inside(folder: Path, name: Any, where: str, what: str) -> Path:
    """A file named by relation.json: a plain name inside the folder (never a path out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"{where}: {what} must be a file name in the examples' folder (got {name!r})")
    path = folder / name
    if not path.is_file():
        raise InputError(f"{where}: {what} {name} does not exist")
    return path


def _keypoints(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    ok = isinstance(value, list) and 1 <= len(value) <= MAX_KEYPOINTS
    ok = ok and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in value)
    if not ok or not all(0 <= v <= 1 for p in value for v in p):
        raise InputError(f"{where}: keypoints must be 1–{MAX_KEYPOINTS} points [x, y] in [0, 1]")
    return tuple((float(x), float(y)) for x, y in value)


def box_foreground(image: Image.Image, box: Box) -> np.ndarray:
    """The object's mask (H, W) in [0, 1]: the subject-photo foreground step run on its box (plus a margin); the box
    itself where that step finds nothing."""
    width, height = image.size
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * BOX_MARGIN, (y1 - y0) * BOX_MARGIN
    left, top = int(max(0, (x0 - mx) * width)), int(max(0, (y0 - my) * height))
    right, bottom = int(min(width, (x1 + mx) * width + 0.999)), int(min(height, (y1 + my) * height + 0.999))
    crop = image.crop((left, top, right, bottom))
    segmenter = find_segmenter()
    found = segmenter(crop) if segmenter is not None else grabcut_mask(crop)  # (h, w) in [0, 1]
    inside = np.zeros((height, width), np.float32)
    bx0, by0 = int(x0 * width), int(y0 * height)
    bx1, by1 = max(bx0 + 1, int(round(x1 * width))), max(by0 + 1, int(round(y1 * height)))
    inside[by0:by1, bx0:bx1] = 1.0
    mask = np.zeros((height, width), np.float32)
    mask[top:bottom, left:right] = found
    mask *= inside  # the object stays in its box, whatever the crop's margin held
    return mask if (mask > 0.5).sum() >= 4 else inside


def mask_keypoints(mask: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Five points (x, y) in [0, 1] from a mask: its centroid and its extremes along both principal axes — where
    the object's ends are, which is what a pose change moves."""
    ys, xs = np.nonzero(mask > 0.5)
    points = np.stack([xs, ys], 1).astype(np.float64) + 0.5  # (P, 2) pixel centres
    centre = points.mean(0)
    spread = points - centre
    _, vectors = np.linalg.eigh(spread.T @ spread)  # columns: minor axis, major axis
    found = [centre]
    for axis in vectors[:, ::-1].T:  # major axis first
        axis = axis if (axis[0], axis[1]) > (0, 0) else -axis  # a fixed sign: the same order in every example
        along = spread @ axis
        found += [points[along.argmax()], points[along.argmin()]]
    height, width = mask.shape
    return tuple((float(x / width), float(y / height)) for x, y in found)


def _mean_box(boxes: list[Box]) -> list[float]:
    return [round(float(np.mean([b[k] for b in boxes])), 3) for k in range(4)]
