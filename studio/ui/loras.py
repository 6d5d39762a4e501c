"""The Compose tab's LoRA list: LoRA files (A1111/ComfyUI's kohya format or diffusers') applied to one image, each at
its own scale.

The list is a two-column table, GenerateForm's `loras` field: rows of [file, scale]. A person uploads a
.safetensors file (a row appears at scale 1) or types a path on this machine, and edits the scale in the table; an
API client sends the rows, e.g. `loras=[["/models/style.safetensors", 0.7]]`. Rows without a file are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from engines.types import MAX_LORAS, InputError, LoraRef

HEADERS = ["LoRA file (.safetensors)", "scale"]


def lora_card(form: dict[str, Any]) -> dict[str, Any]:
    """Add the table to `form` (GenerateForm's widgets by field name); returns the widgets that add a row."""
    with gr.Accordion("LoRAs", open=False, elem_classes="tr-card", elem_id="lora-card"):
        gr.Markdown(
            "Style or character LoRAs for this image, each at its scale (1 = as trained). A learned relation brings its "
            "own LoRA: pick it above.",
            elem_classes="tr-hint",
        )
        form["loras"] = gr.Dataframe(
            value=[],
            headers=HEADERS,
            datatype=["str", "number"],
            column_count=2,
            type="array",
            column_widths=["80%", "20%"],  # an uploaded file's path is long; the scale must stay in view
            wrap=True,
            interactive=True,
            label="LoRA list",
            elem_id="lora-list",
        )
        with gr.Row():
            path = gr.Textbox(
                label="Add by path", placeholder="/models/style.safetensors", scale=3, elem_id="lora-path"
            )
            upload = gr.UploadButton(
                "Add a LoRA file", file_types=[".safetensors"], size="sm", scale=1, elem_id="lora-upload"
            )
            clear = gr.Button("Clear", size="sm", scale=0, min_width=70, elem_id="lora-clear")
    return {"path": path, "upload": upload, "clear": clear}


def wire_lora_card(loras: Any, widgets: dict[str, Any], quiet: dict[str, Any]) -> None:
    widgets["upload"].upload(added, [widgets["upload"], loras], loras, **quiet)
    typed = widgets["path"].submit(added, [widgets["path"], loras], loras, **quiet)
    typed.then(lambda: "", None, widgets["path"], **quiet)
    widgets["clear"].click(lambda: [], None, loras, **quiet)


def added(file: Any, rows: Any) -> list[list[Any]]:
    """The list with one more LoRA at scale 1 (an upload or a typed path)."""
    path = str(getattr(file, "name", None) or file or "").strip()
    if not path:
        return _rows(rows)
    if not path.endswith(".safetensors"):
        gr.Warning(f"{Path(path).name}: Troupe reads LoRA weights from .safetensors files only")
        return _rows(rows)
    return [*_rows(rows), [path, 1.0]]


def lora_refs(rows: Any) -> tuple[LoraRef, ...]:
    """The table's rows as LoraRefs (which check the suffix and the scale); rows without a file are skipped."""
    refs = []
    for path, scale in _rows(rows):
        try:
            number = 1.0 if scale in (None, "") else float(scale)
        except (TypeError, ValueError):
            raise InputError(f"LoRA {Path(path).name}: the scale must be a number (got {scale!r})") from None
        refs.append(LoraRef(path, number))
    if len(refs) > MAX_LORAS:
        raise InputError(f"at most {MAX_LORAS} LoRAs per image (got {len(refs)})")
    return tuple(refs)


def lora_rows(loras: tuple[LoraRef, ...]) -> list[list[Any]]:
    """A request's LoRAs back into the table (PNG reuse, an opened project)."""
    return [[lora.path, lora.scale] for lora in loras]


def _rows(value: Any) -> list[list[Any]]:
    """[file, scale] rows with a file, from the table (a list of rows) or an API client's {"data": rows}."""
    if isinstance(value, dict):
        value = value.get("data")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(row, (list, tuple)) for row in value):
        raise InputError('loras: a list of [file, scale] rows, e.g. [["style.safetensors", 0.7]]')
    rows = []
    for row in value:
        path = str(row[0]).strip() if row and row[0] is not None else ""
        if path:
            rows.append([path, row[1] if len(row) > 1 else 1.0])
    return rows


def check_uploaded(loras: tuple[LoraRef, ...], folders: list[Path]) -> None:
    """On a Space only uploaded LoRAs are read: a typed path must not let a visitor probe the server's files."""
    for lora in loras:
        path = Path(lora.path).expanduser().resolve()
        if not any(path.is_relative_to(folder.resolve()) for folder in folders):
            raise InputError(f"LoRA {path.name}: on this Space add LoRA files by uploading them")
