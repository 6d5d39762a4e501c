"""PNG metadata in and out: our own JSON chunk (the whole request) plus an A1111-style `parameters` chunk."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from engines.types import SCHEDULERS, GenerateRequest, InputError, ReferenceConfig

CHUNK = "troupe"
FORMAT_VERSION = 2  # 2: requests carry `references`; a version-1 image was made before they existed


def png_info(request: GenerateRequest, bundle: Any) -> dict[str, str]:
    """The text chunks of one image: `request` must already carry that image's own seed."""
    model = {"source": bundle.spec.source, "family": bundle.family, "fingerprint": bundle.fingerprint}
    troupe = {"version": FORMAT_VERSION, "request": request.to_dict(), "model": model}
    return {CHUNK: json.dumps(troupe, sort_keys=True), "parameters": a1111_parameters(request, bundle)}


def a1111_parameters(request: GenerateRequest, bundle: Any) -> str:
    size = f"{request.width or bundle.native_size}x{request.height or bundle.native_size}"
    fields = [
        ("Steps", request.steps),
        ("Sampler", SCHEDULERS[request.scheduler].title),
        ("CFG scale", request.cfg),
        ("Seed", request.seed),
        ("Size", size),
        ("Model", bundle.spec.source),
    ]
    if request.layout.regions:
        fields.append(("Troupe regions", json.dumps([[r.label, list(r.box), r.layer] for r in request.layout.regions])))
    if request.relation:
        fields.append(("Troupe relation", f"{request.relation} ({request.relation_scale:g})"))
    if request.loras:  # A1111 writes its LoRAs into the prompt; a field keeps Troupe's prompt as it was typed
        fields.append(("LoRAs", " ".join(f"{Path(lora.path).stem}:{lora.scale:g}" for lora in request.loras)))
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields)
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    return f"{request.prompt}{negative}\n{line}"


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a generated image with its text chunks (taken from `image.info`)."""
    chunks = PngImagePlugin.PngInfo()
    for key in (CHUNK, "parameters"):
        if key in image.info:
            chunks.add_text(key, image.info[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=chunks)
    return path


def read_request(source: str | Path | Image.Image) -> GenerateRequest:
    """The request that made a Troupe PNG (seed included), ready to generate again or to edit."""
    image = source if isinstance(source, Image.Image) else _open(Path(source))
    text = image.info.get(CHUNK) or getattr(image, "text", {}).get(CHUNK)
    if not text:
        raise InputError("this image carries no Troupe settings (was it made by Troupe and saved as PNG?)")
    try:
        data = json.loads(text)
        request = GenerateRequest.from_dict(data["request"])
        version = data.get("version", 1)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise InputError(f"this image's Troupe settings are damaged ({type(error).__name__})") from error
    if version == 1:  # made before reference attention existed: reusing it must not turn references on
        request = replace(request, references=ReferenceConfig(enabled=False))
    return request


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, Image.DecompressionBombError) as error:
        raise InputError(f"{path.name} is not a readable image ({error})") from error
