"""The canvas: a layered box editor (gr.HTML + studio/static/canvas.js) and its JSON ↔ Layout conversion.

The canvas value is one JSON string, written by the browser after every gesture and by Python handlers (relation
picker, "add region", open project):

    {"width": 512, "height": 512,
     "regions": [{"id": "r1", "label": "<rex>", "box": [x0, y0, x1, y1]}, ...],   # back to front
     "suggestions": ["<rex>", "<milo>"]}

`label` is either `<name>` (a registered subject) or words of the prompt. `canvas_to_layout` is the one place
where this JSON becomes an engines.types.Layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from engines.types import InputError, Layout, Region, check_subject_name

STATIC = Path(__file__).resolve().parent / "static"
MAX_REGIONS = 16
_TEMPLATE = """
<div class="tc-root">
  <div class="tc-toolbar">
    <span>Drag to draw · Shift-drag over a box · drag to move · Del deletes</span>
    <span class="tc-right"><label class="tc-ghost-label"><input type="checkbox" class="tc-ghost-toggle" checked>
      last result underneath</label><span class="tc-size"></span></span>
  </div>
  <div class="tc-main">
    <div class="tc-stage-wrap"><div class="tc-stage" tabindex="0" role="application" aria-label="layout canvas"><img class="tc-ghost" alt=""></div></div>
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
    return gr.HTML(value=value, html_template=_TEMPLATE, css_template=(STATIC / "canvas.css").read_text(),
                   js_on_load=(STATIC / "canvas.js").read_text(), elem_id="canvas", **kwargs)


def empty_canvas(width: int = 512, height: int = 512, suggestions: Iterable[str] = ()) -> str:
    return dump({"width": width, "height": height, "regions": [], "suggestions": list(suggestions)})


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def load(text: str | None) -> dict[str, Any]:
    """Parse and check the canvas JSON (from the browser or an API client)."""
    try:
        data = json.loads(text or "{}")
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"the canvas data is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise InputError("the canvas data must be a JSON object")
    unknown = set(data) - {"width", "height", "regions", "suggestions"}
    if unknown:
        raise InputError(f"unknown canvas keys: {', '.join(sorted(unknown))}")
    regions = data.get("regions") or []
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        raise InputError(f"the canvas holds at most {MAX_REGIONS} regions")
    clean = []
    for index, region in enumerate(regions):
        if not isinstance(region, dict) or set(region) - {"id", "label", "box"}:
            raise InputError(f"canvas region {index + 1} must be an object with id, label and box")
        box = region.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise InputError(f"canvas region {index + 1}: box must be four numbers x0,y0,x1,y1")
        clean.append({"id": str(region.get("id") or f"r{index + 1}"), "label": str(region.get("label") or ""),
                      "box": [float(v) for v in box]})
    width, height = data.get("width", 512), data.get("height", 512)
    if not all(isinstance(v, int) and 8 <= v <= 8192 for v in (width, height)):
        raise InputError("canvas width and height must be whole numbers of pixels")
    return {"width": width, "height": height, "regions": clean, "suggestions": list(data.get("suggestions") or [])}


def canvas_to_layout(text: str | None, class_words: Mapping[str, str]) -> Layout:
    """Canvas JSON → Layout: list order is back to front (layer = index); `<name>` binds a registered subject."""
    regions = []
    for index, region in enumerate(load(text)["regions"]):
        label = " ".join(region["label"].split())
        where = f"region {index + 1}"
        if not label:
            raise InputError(f"{where} has no name: type words of the prompt or <subject> in the layer list")
        box = tuple(round(min(max(v, 0.0), 1.0), 4) for v in region["box"])
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise InputError(f"{where} ('{label}') has a box of zero size: drag it larger")
        if label.startswith("<") and label.endswith(">"):
            name = check_subject_name(label[1:-1])
            if name not in class_words:
                known = ", ".join(f"<{n}>" for n in sorted(class_words)) or "none registered yet"
                raise InputError(f"{where}: there is no subject {label} (subjects: {known})")
            regions.append(Region(phrase=class_words[name], box=box, subject=name, layer=index))
        else:
            regions.append(Region(phrase=label, box=box, layer=index))
    return Layout(tuple(regions))


def layout_to_canvas(layout: Layout, width: int, height: int, suggestions: Iterable[str] = ()) -> str:
    """Layout → canvas JSON (back to front; equal layers keep their order)."""
    regions = [{"id": f"r{i + 1}", "label": f"<{r.subject}>" if r.subject else r.phrase, "box": list(r.box)}
               for i, r in enumerate(layout.back_to_front())]
    return dump({"width": width, "height": height, "regions": regions, "suggestions": list(suggestions)})


def add_region(text: str | None, label: str) -> str:
    """Append a region (in front) with a default box, staggered so new boxes don't hide each other."""
    data = load(text)
    label = " ".join((label or "").split())
    if not label:
        raise InputError("pick a subject or type a phrase for the new region")
    if len(data["regions"]) >= MAX_REGIONS:
        raise InputError(f"the canvas holds at most {MAX_REGIONS} regions")
    k = len(data["regions"]) % 5
    x0, y0 = 0.1 + 0.12 * k, 0.15 + 0.08 * k
    used = {r["id"] for r in data["regions"]}
    n = len(used) + 1
    while f"r{n}" in used:
        n += 1
    data["regions"].append({"id": f"r{n}", "label": label, "box": [x0, y0, x0 + 0.4, y0 + 0.5]})
    return dump(data)


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
