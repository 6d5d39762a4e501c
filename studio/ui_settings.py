"""VRAM presets (presets/vram.json): named ways to load a model, validated on load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.types import DTYPES, OFFLOADS, QUANTIZATIONS, InputError, ModelSpec

VRAM_PATH = Path(__file__).resolve().parent.parent / "presets" / "vram.json"
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
_KEYS = {"name", "device", "dtype", "quantization", "offload", "note"}


@dataclass(frozen=True)
class VramPreset:
    name: str
    device: str
    dtype: str
    quantization: str
    offload: str
    note: str = ""

    def spec(self, source: str) -> ModelSpec:
        return ModelSpec(source=source, dtype=self.dtype, quantization=self.quantization, offload=self.offload,
                         device=self.device)


def load_vram_presets(path: str | Path | None = None) -> dict[str, VramPreset]:
    path = Path(path) if path else VRAM_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise InputError(f"{path.name}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, dict) or set(data) - {"version", "notes", "presets"}:
        raise InputError(f"{path.name}: expected an object with version, notes, presets")
    if data.get("version", 1) != 1 or not isinstance(data.get("presets"), list) or not data["presets"]:
        raise InputError(f"{path.name}: version must be 1 and presets a non-empty list")
    presets: dict[str, VramPreset] = {}
    for entry in data["presets"]:
        if not isinstance(entry, dict):
            raise InputError(f"{path.name}: every preset must be an object")
        where = f"{path.name}: preset '{entry.get('name', '?')}'"
        unknown, missing = set(entry) - _KEYS, (_KEYS - {"note"}) - set(entry)
        if unknown or missing:
            raise InputError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        if entry["device"] not in DEVICES:
            raise InputError(f"{where}: device must be one of {', '.join(DEVICES)}")
        for key, allowed in (("dtype", DTYPES), ("quantization", QUANTIZATIONS), ("offload", OFFLOADS)):
            if entry[key] not in allowed:
                raise InputError(f"{where}: {key} must be one of {', '.join(allowed)} (got {entry[key]!r})")
        preset = VramPreset(**entry)
        if preset.name in presets:
            raise InputError(f"{where}: defined twice")
        presets[preset.name] = preset
    return presets


def preset_of(spec: ModelSpec, presets: dict[str, VramPreset]) -> str | None:
    for preset in presets.values():
        if (preset.device, preset.dtype, preset.quantization, preset.offload) == (
                spec.device, spec.dtype, spec.quantization, spec.offload):
            return preset.name
    return None
