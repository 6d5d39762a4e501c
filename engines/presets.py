"""The data files of presets/ (relations, machine presets, sentence templates): one reader, validated on load.

Torch-free: the UI reads these to fill its pickers. Every problem is one InputError naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engines.types import DEVICES, DTYPES, OFFLOADS, QUANTIZATIONS, InputError, ModelSpec, check_keys

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
VRAM_PATH = PRESETS_DIR / "vram.json"


def read_json(path: str | Path, what: str = "file") -> Any:
    """The parsed JSON of a data file, or one line saying why it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path.name}: not a text file ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise InputError(f"{path.name}: not valid JSON ({error.msg} at line {error.lineno})") from error
    except RecursionError as error:
        raise InputError(f"{path.name}: nested too deeply to be a {what}") from error


def versioned_list(data: Any, origin: str, list_key: str) -> list:
    """The non-empty list of a presets file of the form {"version": 1, "notes": "...", list_key: [...]}."""
    check_keys(data, origin, {"version", "notes", list_key})
    if data.get("version", 1) != 1:
        raise InputError(f"{origin}: unsupported version {data.get('version')!r} (this Troupe reads version 1)")
    entries = data.get(list_key)
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{origin}: '{list_key}' must be a non-empty list")
    return entries


@dataclass(frozen=True)
class VramPreset:
    """A named way to load a model on some machine (presets/vram.json)."""

    name: str
    device: str
    dtype: str
    quantization: str
    offload: str
    note: str = ""

    def spec(self, source: str) -> ModelSpec:
        return ModelSpec(
            source=source, dtype=self.dtype, quantization=self.quantization, offload=self.offload, device=self.device
        )


def load_vram_presets(path: str | Path | None = None) -> dict[str, VramPreset]:
    path = Path(path) if path else VRAM_PATH
    presets: dict[str, VramPreset] = {}
    for entry in versioned_list(read_json(path, "machine presets"), path.name, "presets"):
        where = f"{path.name}: preset '{entry.get('name', '?') if isinstance(entry, dict) else '?'}'"
        names = [f.name for f in fields(VramPreset)]
        check_keys(entry, where, names, [n for n in names if n != "note"])
        for key, allowed in (
            ("device", DEVICES),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("offload", OFFLOADS),
        ):
            if entry[key] not in allowed:
                raise InputError(f"{where}: {key} must be one of {', '.join(allowed)} (got {entry[key]!r})")
        preset = VramPreset(**entry)
        if preset.name in presets:
            raise InputError(f"{where}: defined twice")
        presets[preset.name] = preset
    return presets


def preset_of(spec: ModelSpec, presets: dict[str, VramPreset]) -> str | None:
    """The name of the preset that loads a model the way `spec` does, if any."""
    for preset in presets.values():
        if (preset.device, preset.dtype, preset.quantization, preset.offload) == (
            spec.device,
            spec.dtype,
            spec.quantization,
            spec.offload,
        ):
            return preset.name
    return None
