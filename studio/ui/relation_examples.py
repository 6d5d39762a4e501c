"""The examples of a relation being taught in the Relations tab: the draft a person builds by clicking, the example
picture with its boxes drawn, and the folder that Train hands to the engine.

The draft is the `examples` list of the engine's relation.json (engines/relations/examples.py), kept as JSON text in
one widget, so an API client sends the very text a person builds with clicks:

    [{"image": "01.png", "prompt": "a red box leaning on a blue tent",
      "objects": [{"phrase": "red box", "box": [0.1, 0.3, 0.5, 0.9], "keypoints": [[0.2, 0.4]]},
                  {"phrase": "blue tent", "box": [0.45, 0.35, 0.95, 0.95]}]}]

`image` (and an optional `mask`) name uploaded files by their file name. objects[0] is slot A ({a} of the
template), objects[1] slot B. Boxes and keypoints are fractions of the picture, top-left origin.

Train writes the folder deterministically — the uploads' bytes as they are and a relation.json with rounded numbers
in a fixed order — so the same inputs give the same bytes, the engine's digest of the examples is the same, and a
cancelled training resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from engines.types import EXAMPLES_FILE, MAX_EXAMPLES, MAX_KEYPOINTS, MIN_EXAMPLES, InputError

# The engine's limits (engines/relations/examples.py), checked here first so that bad input writes nothing
SLOTS = ("a", "b")
COLOURS = {"a": (249, 115, 22), "b": (59, 130, 246)}  # orange and blue, as the labels beside the picture say
DISPLAY = 384  # the longest side of the picture the person clicks on (a 64 px example is otherwise too small)
MODES = [("Box of A", "box a"), ("Box of B", "box b"), ("Keypoints of A", "points a"), ("Keypoints of B", "points b")]
NEXT_MODE = {"box a": "box b", "box b": "box a"}  # after a box is drawn, the other one is next
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what the upload offers
PLACES = 4  # decimals of a stored fraction: finer than a pixel of any picture the engine accepts


# ------------------------------------------------------------------------------------------------ the draft
def blank(image: str) -> dict[str, Any]:
    return {"image": image, "prompt": "", "objects": [{"phrase": ""}, {"phrase": ""}]}


def parse_draft(text: str | None) -> list[dict[str, Any]]:
    """The annotations widget's JSON as a list of examples, every example with two objects."""
    try:
        draft = json.loads(text or "[]")
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"annotations: not valid JSON ({error})") from None
    if isinstance(draft, dict) and "examples" in draft:  # a whole relation.json pasted in
        draft = draft["examples"]
    if not isinstance(draft, list) or not all(isinstance(e, dict) for e in draft):
        raise InputError('annotations: a JSON list of examples, as relation.json\'s "examples"')
    for entry in draft:
        objects = entry.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
            objects = []
        entry["objects"] = (objects + [{"phrase": ""}, {"phrase": ""}])[:2]
    return draft


def dump_draft(draft: list[dict[str, Any]]) -> str:
    return json.dumps(draft, indent=1, ensure_ascii=False)


def uploads(files: Any) -> dict[str, str]:
    """The uploaded files by file name (what relation.json calls them)."""
    items = files if isinstance(files, list) else ([files] if files else [])
    found: dict[str, str] = {}
    for item in items:
        path = str(getattr(item, "name", None) or getattr(item, "path", None) or item)
        name = Path(path).name
        if name in found:
            raise InputError(f"two uploaded files are named {name}: rename one (relation.json names files by name)")
        found[name] = path
    return found


def entry_of(draft: list[dict[str, Any]], image: str | None) -> dict[str, Any]:
    entry = next((e for e in draft if e.get("image") == image), None)
    if entry is None:
        raise InputError("upload the example images first, then pick one")
    return entry


@dataclass(frozen=True)
class Synced:
    """The draft after an upload, and the words and template a ready-made relation.json named."""

    draft: list[dict[str, Any]]
    relation: str | None = None
    template: str | None = None


def synced(files: Any, draft: list[dict[str, Any]]) -> Synced:
    """The draft for the uploaded files: one example per image, in upload order, keeping what was annotated.

    An uploaded relation.json (a ready-made folder; any name ending in .json) fills every example it describes that
    is still blank, and the images it names as masks are not examples."""
    found = uploads(files)
    ready = _ready_made(next((path for name, path in found.items() if name.lower().endswith(".json")), None))
    given = {e.get("image"): e for e in ready.get("examples", []) if isinstance(e, dict)}
    masks = {o.get("mask") for e in given.values() for o in e.get("objects", []) if isinstance(o, dict)}
    kept = {e.get("image"): e for e in draft if not _is_blank(e)}
    images = [n for n in found if Path(n).suffix.lower() in IMAGE_SUFFIXES and n not in masks]
    images = sorted(images, key=lambda n: (n not in given, list(given).index(n) if n in given else 0))
    merged = [kept.get(n) or given.get(n) or _blank_like(n, draft) for n in images]
    return Synced(parse_draft(json.dumps(merged)), ready.get("relation"), ready.get("template"))


def _ready_made(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{Path(path).name}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise InputError(f'{Path(path).name}: expected a relation.json: {{"relation", "template", "examples": [...]}}')
    words = {k: data[k] for k in ("relation", "template") if isinstance(data.get(k), str)}
    return {"examples": data["examples"], **words}


def _is_blank(entry: dict[str, Any]) -> bool:
    objects = entry.get("objects") or []
    return not entry.get("prompt") and not any(o.get("box") or o.get("phrase") for o in objects)


def _blank_like(image: str, draft: list[dict[str, Any]]) -> dict[str, Any]:
    """A new example starts with the prompt and phrases of the last annotated one: most examples share them."""
    entry = blank(image)
    previous = next((e for e in reversed(draft) if not _is_blank(e)), None)
    if previous is not None:
        entry["prompt"] = previous.get("prompt", "")
        entry["objects"] = [{"phrase": o.get("phrase", "")} for o in previous["objects"]]
    return entry


def with_text(entry: dict[str, Any], prompt: str, phrase_a: str, phrase_b: str) -> None:
    entry["prompt"] = prompt or ""
    for obj, phrase in zip(entry["objects"], (phrase_a, phrase_b)):
        obj["phrase"] = phrase or ""


def copied_to_all(draft: list[dict[str, Any]], source: dict[str, Any]) -> None:
    """Every example gets this one's prompt and phrases (its boxes stay its own)."""
    for entry in draft:
        with_text(entry, source.get("prompt", ""), *(o.get("phrase", "") for o in source["objects"]))


# ------------------------------------------------------------------------------------------------ clicks
def clicked(entry: dict[str, Any], mode: str, pending: Any, point: tuple[float, float]) -> tuple[str, Any]:
    """A click at `point` (fractions of the picture) in `mode`: (the next mode, the pending corner or None).

    A box takes two clicks, on opposite corners: the first is kept as the pending corner; a keypoint is one click."""
    kind, slot = (mode or "box a").split()
    obj = entry["objects"][SLOTS.index(slot)]
    if kind == "points":
        points = [p for p in obj.get("keypoints") or []]
        if len(points) >= MAX_KEYPOINTS:
            raise InputError(f"at most {MAX_KEYPOINTS} keypoints per object")
        obj["keypoints"] = points + [list(point)]
        return mode, None
    if not pending:
        return mode, list(point)
    (x0, x1), (y0, y1) = sorted((pending[0], point[0])), sorted((pending[1], point[1]))
    if x1 - x0 < 0.01 or y1 - y0 < 0.01:
        raise InputError("that box has no size: click two opposite corners of the object")
    obj["box"] = [x0, y0, x1, y1]
    return NEXT_MODE[mode], None


def cleared(entry: dict[str, Any]) -> None:
    """Forget the example's boxes and keypoints (its words stay)."""
    for obj in entry["objects"]:
        obj.pop("box", None)
        obj.pop("keypoints", None)


def fraction(index: Any, size: tuple[int, int]) -> tuple[float, float]:
    """Gradio's click position (pixels of the shown picture) as fractions of it."""
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError("click on the picture itself")
    return tuple(round(min(max(float(v) / s, 0.0), 1.0), PLACES) for v, s in zip(index, size))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ the picture
def shown(path: str, entry: dict[str, Any], pending: Any = None, mode: str = "box a") -> Image.Image:
    """The example scaled to DISPLAY with its boxes, keypoints and a pending corner drawn in the slots' colours."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")  # upright, as the engine reads it
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise InputError(f"example {Path(path).name}: not a readable image ({error.__class__.__name__})") from None
    scale = DISPLAY / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.NEAREST if scale > 2 else Image.LANCZOS)  # small examples stay crisp
    draw = ImageDraw.Draw(image)
    for slot, obj in zip(SLOTS, entry["objects"]):
        colour = COLOURS[slot]
        box = obj.get("box")
        if isinstance(box, list) and len(box) == 4:
            x0, y0, x1, y1 = (v * s for v, s in zip(box, size * 2))
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=3)
            draw.rectangle((x0, y0, x0 + 16, y0 + 16), fill=colour)
            draw.text((x0 + 4, y0 + 2), slot.upper(), fill="white")
        for x, y in obj.get("keypoints") or []:
            cx, cy = x * size[0], y * size[1]
            draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=colour, outline="white", width=2)
    if pending:
        colour = COLOURS[(mode or "box a").split()[1]]
        cx, cy = pending[0] * size[0], pending[1] * size[1]
        draw.line((cx - 9, cy, cx + 9, cy), fill=colour, width=2)
        draw.line((cx, cy - 9, cx, cy + 9), fill=colour, width=2)
    return image


def summary(draft: list[dict[str, Any]], image: str | None) -> str:
    """One line on the picked example and how many are ready to train."""
    if not draft:
        return f"Upload {MIN_EXAMPLES}–{MAX_EXAMPLES} example images (or a ready folder's {EXAMPLES_FILE} with them)."
    ready = sum(1 for e in draft if _problem(e) is None)
    total = f"**{ready} of {len(draft)} examples ready**"
    entry = next((e for e in draft if e.get("image") == image), None)
    if entry is None:
        return total
    problem = _problem(entry)
    points = ", ".join(f"{slot.upper()} {len(o.get('keypoints') or [])}" for slot, o in zip(SLOTS, entry["objects"]))
    state = f"needs: {problem}" if problem else "ready"
    return f"{total} · `{image}`: {state} · keypoints {points}"


# ------------------------------------------------------------------------------------------------ the folder
@dataclass(frozen=True)
class ExampleFolder:
    """The checked examples and the files they name: what Train writes for the engine."""

    relation: str
    template: str
    examples: tuple[dict[str, Any], ...]
    files: tuple[tuple[str, str], ...]  # (file name, uploaded path), every file relation.json names

    def document(self) -> str:
        data = {"relation": self.relation, "template": self.template, "examples": list(self.examples)}
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    def write(self, folder: Path) -> Path:
        """The folder, replaced whole: the uploads' bytes unchanged and relation.json; same inputs, same bytes."""
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name, source in self.files:
            shutil.copyfile(source, folder / name)
        (folder / EXAMPLES_FILE).write_text(self.document(), encoding="utf-8")
        return folder


def checked(relation: str, template: str, files: Any, draft: list[dict[str, Any]]) -> ExampleFolder:
    """Every check a person can fix here, before anything is written: one line naming the example and what it needs.
    The engine then reads the written folder with its own checks (the pictures themselves, the masks)."""
    words = " ".join((relation or "").split())
    if not words:
        raise InputError('name the relation in words, e.g. "leaning on"')
    template = " ".join((template or "").split())
    if template.count("{a}") != 1 or template.count("{b}") != 1:
        raise InputError(f"the template needs {{a}} and {{b}} once each, e.g. {{a}} {words} {{b}}")
    if not MIN_EXAMPLES <= len(draft) <= MAX_EXAMPLES:
        raise InputError(f"a relation is taught from {MIN_EXAMPLES}–{MAX_EXAMPLES} example images (got {len(draft)})")
    found = uploads(files)
    examples, names = [], []
    for entry in draft:
        image = entry.get("image")
        problem = _problem(entry) or _missing(entry, found)
        if problem:
            raise InputError(f"example {image}: {problem}")
        examples.append(_clean(entry))
        names += [image] + [o["mask"] for o in entry["objects"] if o.get("mask")]
    if len(set(e["image"] for e in examples)) != len(examples):
        raise InputError("each example needs its own image: one is listed twice")
    return ExampleFolder(words, template, tuple(examples), tuple((n, found[n]) for n in dict.fromkeys(names)))


def _problem(entry: dict[str, Any]) -> str | None:
    """What an example still needs (None: it is ready), in words a person acts on."""
    prompt = " ".join(_text(entry.get("prompt")).split())
    if not prompt:
        return "write its prompt"
    for slot, obj in zip(SLOTS, entry["objects"]):
        phrase = " ".join(_text(obj.get("phrase")).split())
        if not phrase:
            return f"name object {slot.upper()} (words of its prompt)"
        if phrase not in prompt:
            return f"object {slot.upper()} '{phrase}' must be words of its prompt"
        if not _is_box(obj.get("box")):
            return f"the box of {slot.upper()}: click two opposite corners on the picture"
        if not _are_points(obj.get("keypoints", [])):
            return f"the keypoints of {slot.upper()} must be 0–{MAX_KEYPOINTS} points [x, y] in [0, 1]"
        if obj.get("mask") is not None and not isinstance(obj["mask"], str):
            return f"the mask of {slot.upper()} must be a file name"
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _missing(entry: dict[str, Any], found: dict[str, str]) -> str | None:
    wanted = [entry.get("image")] + [o.get("mask") for o in entry["objects"] if o.get("mask")]
    absent = [str(name) for name in wanted if name not in found]
    return f"upload {', '.join(absent)} too" if absent else None


def _is_box(box: Any) -> bool:
    ok = isinstance(box, list) and len(box) == 4 and all(_is_fraction(v) for v in box)
    return ok and box[0] < box[2] and box[1] < box[3]


def _are_points(points: Any) -> bool:
    ok = isinstance(points, list) and len(points) <= MAX_KEYPOINTS
    return ok and all(isinstance(p, list) and len(p) == 2 and all(_is_fraction(v) for v in p) for p in points)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _clean(entry: dict[str, Any]) -> dict[str, Any]:
    """The example as relation.json holds it: fixed key order, words single-spaced, numbers rounded."""
    objects = []
    for obj in entry["objects"]:
        item: dict[str, Any] = {
            "phrase": " ".join(obj["phrase"].split()),
            "box": [round(v, PLACES) for v in obj["box"]],
        }
        if obj.get("mask"):
            item["mask"] = obj["mask"]
        if obj.get("keypoints"):
            item["keypoints"] = [[round(float(v), PLACES) for v in p] for p in obj["keypoints"]]
        objects.append(item)
    return {"image": entry["image"], "prompt": " ".join(entry["prompt"].split()), "objects": objects}


def discard(folder: Path, keep: Path) -> None:
    """Remove a work folder and its parents that it leaves empty, up to `keep` (the library): bad input leaves
    nothing behind."""
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent != keep and keep in parent.parents:
        try:
            os.rmdir(parent)
        except OSError:
            return
        parent = parent.parent
