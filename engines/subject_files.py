"""The files of one subject: the schema of subject.json, the residual tensors, and the images an export carries.

Everything here checks what it reads before anything is written (engines/library.py does the writing).
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engines.types import FAMILIES, InputError, check_keys, check_subject_name

FORMAT_VERSION = 1
ENCODER_KEYS = ("text_encoder", "text_encoder_2")
RESIDUALS = "residuals.safetensors"
META = "subject.json"
THUMBNAIL = "thumbnail.png"
THUMBNAIL_SIDE = 128
MAX_CURVE_POINTS = 100  # the stored loss curve is averaged down to this many points (keeps subject.json small)
EXPORT_KEY = "troupe_subject"
# An exported file's tensors live under one prefix (layout 2; layout 1 used bare names: text_encoder, photo.0, ...).
# A bare 2-D `text_encoder` tensor of the encoder's width is what embedding loaders (ComfyUI's, A1111's, diffusers')
# take for a textual inversion, and a Cones 2 residual is added to the encoder's *output*, not its input: named
# apart, and with a marker that sorts first, a loader that takes "the first tensor" gets the marker, not a residual.
FILE_PREFIX = "troupe.subject."
FILE_LAYOUT = 2
# The marker, int64 [FILE_LAYOUT], comes first both by name ("format" < "mask." < "photo." < "residual." <
# "thumbnail") and in the file, which safetensors orders by dtype (widest first: int64 before the float32 residuals)
LAYOUT_KEY = FILE_PREFIX + "format"
RESIDUAL_PREFIX = "residual."
_META_KEYS = {
    "format_version": int,
    "name": str,
    "class_word": str,
    "family": str,
    "fingerprint": str,
    "created": str,
    "steps": int,
    "loss_curve": list,
    "photos": list,
    "masks": list,
    "stats": dict,
    "residual": bool,  # False: an instant subject (no residuals.safetensors; its photos carry it)
}


def downsample_curve(curve: list[float] | tuple[float, ...], points: int = MAX_CURVE_POINTS) -> list[float]:
    """Average a loss curve down to at most `points` buckets."""
    values = [float(v) for v in curve]
    if len(values) <= points:
        return values
    edges = np.linspace(0, len(values), points + 1).round().astype(int)
    return [float(np.mean(values[a:b])) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def check_residuals(residuals: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if not residuals or set(residuals) - set(ENCODER_KEYS) or "text_encoder" not in residuals:
        raise InputError(f"{where}: residuals must be keyed {' / '.join(ENCODER_KEYS)} (got {sorted(residuals)})")
    out = {}
    for key, value in residuals.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
            raise InputError(f"{where}: residual '{key}' must be a 2-D tensor (class tokens, width)")
        value = value.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(value).all():
            raise InputError(f"{where}: residual '{key}' has NaN or infinite values")
        out[key] = value
    counts = {v.shape[0] for v in out.values()}
    if len(counts) != 1:
        raise InputError(f"{where}: the encoders' residuals cover different numbers of class tokens")
    return out


def photo_loss(stats: dict[str, Any]) -> tuple[float, float] | None:
    """(before, after) from the training stats, when they hold both numbers (subjects imported from older files
    may not)."""
    pair = stats.get("l_sub_eval_before"), stats.get("l_sub_eval_after")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
        return float(pair[0]), float(pair[1])
    return None


def validate_meta(meta: Any, where: str) -> dict[str, Any]:
    required = ("format_version", "name", "class_word", "family", "fingerprint", "created", "steps")
    check_keys(meta, where, _META_KEYS, required)
    for key, kind in _META_KEYS.items():
        if key in meta and (not isinstance(meta[key], kind) or (kind is not bool and isinstance(meta[key], bool))):
            raise InputError(f"{where}: '{key}' must be a {kind.__name__}")
    if meta["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"{where}: format version {meta['format_version']} is not supported (this Troupe reads {FORMAT_VERSION})"
        )
    check_subject_name(meta["name"])
    if not meta["class_word"].strip() or len(meta["class_word"]) > 100:
        raise InputError(f"{where}: the class word must be 1–100 characters")
    if meta["family"] not in FAMILIES:
        raise InputError(f"{where}: unknown model family '{meta['family']}'")
    if meta["steps"] < 0:
        raise InputError(f"{where}: steps must be ≥ 0")
    try:
        datetime.fromisoformat(meta["created"])
    except ValueError as error:
        raise InputError(f"{where}: 'created' is not an ISO 8601 time") from error
    for value in meta.get("loss_curve", []):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"{where}: the loss curve must hold finite numbers")
    for key in ("photos", "masks"):
        for file_name in meta.get(key, []):
            if not isinstance(file_name, str) or Path(file_name).name != file_name or not file_name.endswith(".png"):
                raise InputError(f"{where}: bad file name in '{key}': {file_name!r}")
    if not meta.get("residual", True) and not meta.get("photos"):
        raise InputError(f"{where}: a subject without a residual needs its photos")
    return meta


def to_image(tensor: torch.Tensor, mode: str, where: str) -> Image.Image:
    ok = tensor.dtype == torch.uint8 and (
        (mode == "L" and tensor.ndim == 2) or (mode == "RGB" and tensor.ndim == 3 and tensor.shape[2] == 3)
    )
    if not ok or min(tensor.shape[:2]) < 1 or max(tensor.shape[:2]) > 4096:
        raise InputError(f"{where}: an embedded image has a bad shape or type")
    return Image.fromarray(tensor.numpy()).convert(mode)


def fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pack_export(residuals: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an exported file (layout 2): the marker, each encoder's residual and the images, prefixed."""
    tensors = {LAYOUT_KEY: torch.tensor([FILE_LAYOUT], dtype=torch.int64)}
    tensors.update({f"{FILE_PREFIX}{RESIDUAL_PREFIX}{key}": value for key, value in residuals.items()})
    tensors.update({f"{FILE_PREFIX}{key}": value for key, value in images.items()})
    return {key: value.contiguous() for key, value in tensors.items()}


def unpack_export(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """An exported file's tensors by their bare names (text_encoder, thumbnail, photo.0, ...), from either layout:
    files exported before the prefix (layout 1) keep importing."""
    prefixed = {key for key in tensors if key.startswith(FILE_PREFIX)}
    if not prefixed:
        return dict(tensors)  # layout 1
    if len(prefixed) != len(tensors):
        strays = sorted(set(tensors) - prefixed)
        raise InputError(f"{where}: tensors outside {FILE_PREFIX}*: {', '.join(strays)}")
    marker = tensors.get(LAYOUT_KEY)
    if marker is None or marker.numel() != 1 or int(marker.flatten()[0]) != FILE_LAYOUT:
        found = "none" if marker is None or marker.numel() != 1 else int(marker.flatten()[0])
        raise InputError(f"{where}: subject file layout {found} is not one this Troupe reads ({FILE_LAYOUT})")
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix(FILE_PREFIX)
        if key == LAYOUT_KEY:
            continue
        if name.startswith(RESIDUAL_PREFIX):
            name = name.removeprefix(RESIDUAL_PREFIX)
            if name not in ENCODER_KEYS:
                raise InputError(f"{where}: unexpected residual {name}")
        elif name in ENCODER_KEYS:  # a bare encoder name under the prefix would read as a residual: refused
            raise InputError(f"{where}: unexpected tensor {key}")
        out[name] = value
    return out
