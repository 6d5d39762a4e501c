"""The canvas: a layered box editor (gr.HTML + static/canvas.js) and its JSON ↔ Layout conversion.

The canvas value is one JSON string. The browser writes it after every gesture; Python handlers write it too
(relation picker, "add region", open project), and an API client passes it to /generate as `canvas`:

    {"width": 512, "height": 512,
     "regions": [{"id": "r1", "label": "<rex>", "box": [0.05, 0.3, 0.45, 0.75]},
                 {"id": "r2", "label": "red ball", "box": [0.55, 0.3, 0.95, 0.75], "layer": 0}],
     "suggestions": ["<rex>", "<milo>"]}

- `width`, `height`: the canvas in pixels (whole numbers in LIMITS.min_side..LIMITS.max_side); boxes are relative
  to it, so the same canvas serves any output size.
- `regions`: at most LIMITS.regions. `box` is [x0, y0, x1, y1] as fractions of the canvas in [0, 1], top-left
  origin; a number outside [0, 1] (or not a finite number) is refused, as the CLI's --box refuses it. The list runs back to front: a region's layer is its index (0 = back)
  unless it carries an optional integer `layer` ≥ 0, which then sets its layer; where boxes overlap, the higher
  layer owns the pixels, and on equal layers the later region does.
- `label`: `<name>` binds the registered subject `name` (its class word becomes the region's phrase); anything
  else is words that must appear in the prompt. `id` is the editor's handle for the region (optional from an API).
- `suggestions`: the labels the editor offers while typing (filled by the studio; optional).

`canvas_to_layout` is the one place where this JSON becomes an engines.types.Layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from engines.types import LIMITS, InputError, Layout, Region, check_keys, check_subject_name, unknown_subject

STATIC = Path(__file__).resolve().parent / "static"
CANVAS_KEYS = ("width", "height", "regions", "suggestions")
REGION_KEYS = ("id", "label", "box", "layer")
_TEMPLATE = """
<div class="tc-root">
  <div class="tc-toolbar">
    <span>Drag to draw · Shift-drag over a box · drag to move · Del deletes</span>
    <span class="tc-right"><label class="tc-ghost-label"><input type="checkbox" class="tc-ghost-toggle" checked>
      last result underneath</label><span class="tc-size"></span></span>
  </div>
  <div class="tc-main">
    <div class="tc-stage-wrap"><div class="tc-stage" tabindex="0" role="application" aria-label="layout canvas">
      <img class="tc-ghost" alt=""></div></div>
    <div class="tc-layers" id="layer-list">
      <div class="tc-layers-head"><span>Layers</span><small>front ▲</small></div>
      <div class="tc-rows"></div>
      <div class="tc-layers-foot">back ▼</div>
      <datalist></datalist>
    </div>
  </div>
  <div class="tc-msg" aria-live="polite"></div>
</div>
"""


def canvas_component(value: str, **kwargs: Any) -> gr.HTML:
    return gr.HTML(
        value=value,
        html_template=_TEMPLATE,
        css_template=(STATIC / "canvas.css").read_text(),
        js_on_load=(STATIC / "canvas.js").read_text(),
        elem_id="canvas",
        **kwargs,
    )


def empty_canvas(width: int = 512, height: int = 512, suggestions: Iterable[str] = ()) -> str:
    return dump({"width": width, "height": height, "regions": [], "suggestions": list(suggestions)})


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def load(text: str | None) -> dict[str, Any]:
    """Parse and check the canvas JSON (from the browser or an API client); regions keep their given order."""
    try:
        data = json.loads(text or "{}")
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"the canvas data is not valid JSON: {error}") from None
    except RecursionError:  # JSON nested thousands of levels deep
        raise InputError("the canvas data is nested too deeply to be a canvas") from None
    check_keys(data, "canvas", CANVAS_KEYS)
    suggestions = data.get("suggestions") or []
    if not (isinstance(suggestions, list) and all(isinstance(v, str) for v in suggestions)):
        raise InputError("canvas suggestions must be a list of labels (text)")
    regions = data.get("regions") or []
    if not isinstance(regions, list) or len(regions) > LIMITS.regions:
        raise InputError(f"the canvas holds at most {LIMITS.regions} regions")
    width, height = data.get("width", 512), data.get("height", 512)
    if not all(_whole(v) and LIMITS.min_side <= v <= LIMITS.max_side for v in (width, height)):
        raise InputError(
            f"canvas width and height must be whole numbers of pixels in {LIMITS.min_side}..{LIMITS.max_side}"
        )
    return {
        "width": width,
        "height": height,
        "suggestions": list(suggestions),
        "regions": [_clean_region(region, index) for index, region in enumerate(regions)],
    }


def _clean_region(region: Any, index: int) -> dict[str, Any]:
    where = f"canvas region {index + 1}"
    check_keys(region, where, REGION_KEYS, required=("box",))
    box = region["box"]
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise InputError(f"{where}: box must be four numbers x0,y0,x1,y1")
    if not all(0.0 <= v <= 1.0 for v in box):
        raise InputError(f"{where}: box {box} must lie inside the canvas (every number in [0, 1])")
    if not all(isinstance(region.get(key) or "", (str, int)) for key in ("id", "label")):
        raise InputError(f"{where}: id and label must be text")
    clean = {
        "id": str(region.get("id") or f"r{index + 1}"),
        "label": str(region.get("label") or ""),
        "box": [float(v) for v in box],
    }
    if region.get("layer") is not None:  # an explicit layer; otherwise the list index is the layer
        if not (_whole(region["layer"]) and region["layer"] >= 0):
            raise InputError(f"{where}: layer must be a whole number ≥ 0 (0 is the back)")
        clean["layer"] = region["layer"]
    return clean


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # math.isfinite overflows on a huge int


def canvas_to_layout(text: str | None, class_words: Mapping[str, str]) -> Layout:
    """Canvas JSON → Layout: a region's layer is its `layer` or else its index; `<name>` binds a subject."""
    regions = []
    for index, region in enumerate(load(text)["regions"]):
        label = " ".join(region["label"].split())
        where = f"region {index + 1}"
        if not label:
            raise InputError(f"{where} has no name: type words of the prompt or <subject> in the layer list")
        box = tuple(round(v, 4) for v in region["box"])  # in [0, 1]: load() refuses anything else
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise InputError(f"{where} ('{label}') has a box of zero size: drag it larger")
        layer = region.get("layer", index)
        if label.startswith("<") and label.endswith(">"):
            name = check_subject_name(label[1:-1])
            if name not in class_words:
                raise unknown_subject(name, class_words)
            regions.append(Region(phrase=class_words[name], box=box, subject=name, layer=layer))
        else:
            regions.append(Region(phrase=label, box=box, layer=layer))
    return Layout(tuple(regions))


def layout_to_canvas(layout: Layout, width: int, height: int, suggestions: Iterable[str] = ()) -> str:
    """Layout → canvas JSON, listed back to front; the editor keeps no `layer` keys, the order says it all."""
    regions = [{"id": f"r{i + 1}", "label": r.label, "box": list(r.box)} for i, r in enumerate(layout.back_to_front())]
    return dump({"width": width, "height": height, "regions": regions, "suggestions": list(suggestions)})


def add_region(text: str | None, label: str) -> str:
    """Append a region (in front) with a default box, staggered so new boxes don't hide each other."""
    data = load(text)
    label = " ".join((label or "").split())
    if not label:
        raise InputError("pick a subject or type a phrase for the new region")
    if len(data["regions"]) >= LIMITS.regions:
        raise InputError(f"the canvas holds at most {LIMITS.regions} regions")
    stagger = len(data["regions"]) % 5
    x0, y0 = 0.1 + 0.12 * stagger, 0.15 + 0.08 * stagger
    used = {r["id"] for r in data["regions"]}
    number = len(used) + 1
    while f"r{number}" in used:
        number += 1
    region: dict[str, Any] = {"id": f"r{number}", "label": label, "box": [x0, y0, x0 + 0.4, y0 + 0.5]}
    layers = [r.get("layer", i) for i, r in enumerate(data["regions"])]
    if any("layer" in r for r in data["regions"]):
        region["layer"] = max(layers) + 1  # "in front" must stay true when other regions carry explicit layers
    data["regions"].append(region)
    return dump(data)


def cleared(text: str | None) -> str:
    return dump({**load(text), "regions": []})


def with_size(text: str | None, width: int, height: int) -> str:
    data = load(text)
    data["width"], data["height"] = width, height
    return dump(data)


def with_suggestions(text: str | None, suggestions: Iterable[str]) -> str:
    data = load(text)
    data["suggestions"] = list(suggestions)
    return dump(data)


def size_of(text: str | None) -> tuple[int, int]:
    data = load(text)
    return data["width"], data["height"]
