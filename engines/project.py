"""Project files: a whole composition (prompt, settings, regions with their layers, relation, subjects) as one JSON.

    {"format": "troupe-project", "version": 1,
     "request": GenerateRequest.to_dict(),          # prompt, layout (regions, layers), relation, seed, settings
     "canvas": {"width": W, "height": H},
     "subjects": {"rex": "dog", ...},                # the subjects it names, with their class words
     "model": "demo"}

Validated on open: unknown keys and bad values are one readable InputError.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.presets import read_json
from engines.types import GenerateRequest, InputError, check_keys
from engines.types.checks import printable

FORMAT = "troupe-project"
_KEYS = {"format", "version", "request", "canvas", "subjects", "model", "saved"}
MAX_BYTES = 2_000_000


@dataclass(frozen=True)
class Project:
    request: GenerateRequest
    width: int
    height: int
    subjects: dict[str, str]
    model: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": 1,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "model": self.model,
                "request": self.request.to_dict(),
                "canvas": {"width": self.width, "height": self.height},
                "subjects": self.subjects,
            },
            indent=2,
        )

    def save(self, folder: Path, stem: str = "composition") -> Path:
        """Written whole or not at all (a temporary file renamed into place)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.troupe.json"
        partial = path.with_name(f".{path.name}.part")
        partial.write_text(self.to_json(), encoding="utf-8")
        os.replace(partial, path)
        return path


def parse_project(data: Any) -> Project:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError('this is not a Troupe project file (expected "format": "troupe-project")')
    check_keys(data, "project file", _KEYS)
    if data.get("version") != 1:
        raise InputError(f"project file: unsupported version {data.get('version')!r} (this Troupe reads version 1)")
    if not isinstance(data.get("request") or {}, dict):
        raise InputError("project file: request must be a JSON object")
    try:
        request = GenerateRequest.from_dict(data.get("request") or {})
    except (TypeError, AttributeError, ValueError, KeyError) as error:  # a missing field, or one of the wrong type
        raise InputError(printable(f"project file: bad request ({type(error).__name__}: {error})")[:300]) from None
    canvas = check_keys(data.get("canvas") or {}, "project file: canvas", ("width", "height"))
    width = canvas.get("width", request.width or 512)
    height = canvas.get("height", request.height or 512)
    if not all(isinstance(v, int) and 8 <= v <= 8192 for v in (width, height)):
        raise InputError("project file: canvas width and height must be whole numbers of pixels")
    subjects = data.get("subjects") or {}
    if not isinstance(subjects, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in subjects.items()
    ):
        raise InputError("project file: subjects must map names to class words")
    model = data.get("model") or ""
    if not isinstance(model, str):
        raise InputError("project file: model must be a string")
    return Project(request=request, width=width, height=height, subjects=dict(subjects), model=model)


def read_project(path: str | Path) -> Project:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"project file {path.name}: {'is a folder' if path.is_dir() else 'no such file'}")
    if path.stat().st_size > MAX_BYTES:
        raise InputError("project file is too large to be a Troupe project")
    return parse_project(read_json(path, "project file"))
