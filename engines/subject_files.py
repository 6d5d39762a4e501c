"""The files of one subject: the schema of subject.json, the residual tensors, and the images an export carries.

Everything here checks what it reads before anything is written (engines/library.py does the writing).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engines.types import FAMILIES, InputError, check_keys, check_subject_name
from engines.types.checks import control_free
from engines.types.subjects import CLASS_WORD_CHARS, check_class_word

FORMAT_VERSION = 1
ENCODER_KEYS = ("text_encoder", "text_encoder_2")
RESIDUALS = "residuals.safetensors"
META = "subject.json"
THUMBNAIL = "thumbnail.png"
THUMBNAIL_SIDE = 128
# A residual row's RMS (its L2 norm / √width) may be at most this. Δ is added to the text encoder's output at the class
# tokens (Cones 2 Eq. 6); those outputs come out of a layer norm with an RMS of about 1 (the demo encoder's tokens have
# norms 10.4–12.0 at width 128, i.e. RMS 0.92–1.06; CLIP's and OpenCLIP's are of the same order), and a trained Δ
# moves them by a fraction of that. 100× the token itself is far beyond any training yet still far from fp16's
# overflow (an element is at most 100·√2048 ≈ 4,500 < 65,504): a bigger residual — an imported 1e30 — only turns every
# picture black, so it is refused with the file's name.
MAX_RESIDUAL_RMS = 100.0
# A class word may take at most this many tokens of a tokenizer: the longest sentence of the registration bank has
# 30 tokens besides the class word, so with 32 every sentence still fits CLIP's 77-token window (and a prompt has room
# for its other words); a longer "word" would be cut off or crash the tokenized bank.
MAX_CLASS_TOKENS = 32
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
        rms = float((value.double().square().mean(dim=1)).sqrt().max())  # the largest row's RMS
        if rms > MAX_RESIDUAL_RMS:
            raise InputError(
                f"{where}: residual '{key}' is absurdly large (RMS {rms:.3g}; a trained residual stays below "
                f"{MAX_RESIDUAL_RMS:g}): the file is damaged or not a Troupe subject"
            )
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


def check_class_tokens(tokenizers: list, class_word: str) -> None:
    """The class word fits every tokenizer of the loaded model with room for a sentence around it."""
    for tokenizer in tokenizers:
        count = len(tokenizer(class_word, add_special_tokens=False).input_ids)
        if not 1 <= count <= MAX_CLASS_TOKENS:
            raise InputError(
                f"the class word {class_word!r} takes {count} tokens of the text encoder (1–{MAX_CLASS_TOKENS} "
                "fit): use a shorter word"
            )


def validate_meta(meta: Any, where: str, strict: bool = True) -> dict[str, Any]:
    """subject.json checked key by key. `strict` (imports, new subjects) holds the class word to today's rule; a
    subject already in the library (`strict=False`) keeps a class word from before it, unless it holds control
    characters, which are never shown raw."""
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
    if strict:
        check_class_word(meta["class_word"], f"{where}: the class word")
    elif not (control_free(meta["class_word"]) and meta["class_word"].strip()):
        raise InputError(f"{where}: the class word is empty or holds control characters")
    elif len(meta["class_word"]) > CLASS_WORD_CHARS:
        raise InputError(f"{where}: the class word must be 1–{CLASS_WORD_CHARS} characters")
    if not (control_free(meta["fingerprint"]) and len(meta["fingerprint"]) <= 64):
        raise InputError(f"{where}: 'fingerprint' must be a short plain string")
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
            if (
                not isinstance(file_name, str)
                or Path(file_name).name != file_name
                or not file_name.endswith(".png")
                or not control_free(file_name)
            ):
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


def image_tensors(folder: Path, images: list[tuple[str, str]], where: str) -> dict[str, torch.Tensor]:
    """The (key, file name) images of a subject folder as uint8 tensors for an export: masks (H, W), others (H, W, 3)."""
    out = {}
    for key, file_name in images:
        try:
            with Image.open(folder / file_name) as image:
                pixels = np.array(image.convert("L" if key.startswith("mask") else "RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(f"{where}: {file_name} is unreadable ({type(error).__name__}): "
                             "python -m studio subjects check") from None  # fmt: skip
        out[key] = torch.from_numpy(pixels)
    return out


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


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file, or one InputError line naming it when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return file.metadata() or {}, {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not one of its own
        raise InputError(f"{path.name}: not a readable safetensors file ({type(error).__name__})") from None


def read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, list, list]:
    """An exported subject file checked whole: (subject.json, residuals or None, photos, masks). Every way a file can
    be wrong — not safetensors, no or bad metadata, tensors missing, extra or of the wrong kind — is an InputError
    naming the file; nothing is written."""
    header, tensors = read_safetensors(path)
    tensors = unpack_export(tensors, path.name)
    if EXPORT_KEY not in header:
        raise InputError(f"{path.name}: no Troupe subject metadata in this file")
    try:
        meta = json.loads(header[EXPORT_KEY])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise InputError(f"{path.name}: the subject metadata is not valid JSON") from None
    meta = validate_meta(meta, path.name)
    counts = {"photo": len(meta.get("photos", [])), "mask": len(meta.get("masks", []))}
    if counts["photo"] != counts["mask"]:
        raise InputError(f"{path.name}: {counts['photo']} photos but {counts['mask']} masks")
    images = {f"{kind}.{i}" for kind, n in counts.items() for i in range(n)}
    unknown = set(tensors) - set(ENCODER_KEYS) - {"thumbnail"} - images
    if unknown:
        raise InputError(f"{path.name}: unexpected tensors {', '.join(sorted(unknown))}")
    missing = images - set(tensors)
    if missing:
        raise InputError(f"{path.name}: the metadata lists images the file lacks: {', '.join(sorted(missing))}")
    residuals = None
    if meta.get("residual", True):
        residuals = check_residuals({k: v for k, v in tensors.items() if k in ENCODER_KEYS}, path.name)
    elif set(tensors) & set(ENCODER_KEYS):
        raise InputError(f"{path.name}: an instant subject carries no residual, but this file has one")
    photos = [to_image(tensors[f"photo.{i}"], "RGB", path.name) for i in range(counts["photo"])]
    masks = [to_image(tensors[f"mask.{i}"], "L", path.name) for i in range(counts["mask"])]
    if not photos and "thumbnail" in tensors:
        photos = [to_image(tensors["thumbnail"], "RGB", path.name)]
        masks = [Image.new("L", photos[0].size, 255)]
    return meta, residuals, photos, masks


def export_path(dest: str | Path, name: str, root: Path) -> Path:
    """Where an export of subject `name` goes: a .safetensors file, or `<name>.safetensors` in a folder; never a
    device, a special file or the library `root` itself (an export there would be a foreign entry in it)."""
    dest = Path(dest).expanduser()
    if dest.is_dir() or (not dest.suffix and not dest.exists()):  # a folder (existing, or to be made)
        dest = dest / f"{name}.safetensors"
    if dest.exists() and not dest.is_file():
        raise InputError(f"cannot export to {dest}: it is not a regular file")
    if dest.suffix != ".safetensors":
        raise InputError(f"export to a .safetensors file or a folder (got {dest.name})")
    library = root.resolve()
    if library == dest.resolve().parent or library in dest.resolve().parents:
        raise InputError(f"cannot export to {dest}: it is inside the library folder; pick another place")
    return dest
