"""PNG metadata in and out: our own JSON chunk (the whole request) plus an A1111-style `parameters` chunk.

A1111's and ComfyUI's own PNGs are read as a starting request by engines/png_import.py."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from engines.types import GenerateRequest, InputError, ReferenceConfig
from engines.types.tables import sampler_title

CHUNK = "troupe"
FORMAT_VERSION = 2  # 2: requests carry `references`; a version-1 image was made before they existed
VAE_HASH, TI_HASH = 10, 12  # hex digits A1111 writes for `VAE hash` and for each embedding in `TI hashes`


def png_info(request: GenerateRequest, bundle: Any) -> dict[str, str]:
    """The text chunks of one image: `request` must already carry that image's own seed."""
    model = {"source": bundle.spec.source, "family": bundle.family, "fingerprint": bundle.fingerprint}
    model.update(model_files(request, bundle))
    troupe = {"version": FORMAT_VERSION, "request": request.to_dict(), "model": model}
    return {CHUNK: json.dumps(troupe, sort_keys=True), "parameters": a1111_parameters(request, bundle)}


def a1111_parameters(request: GenerateRequest, bundle: Any) -> str:
    size = f"{request.width or bundle.native_size}x{request.height or bundle.native_size}"
    fields = [
        ("Steps", request.steps),
        ("Sampler", ran_sampler(request.scheduler, bundle)),
        ("CFG scale", request.cfg),
        ("Seed", request.seed),
        ("Size", size),
        ("Model hash", model_hash(bundle.spec.source)),
        ("Model", model_name(bundle.spec.source)),
    ]
    files = model_files(request, bundle)  # A1111's names and order: VAE hash, VAE, ..., TI hashes
    if "vae" in files:
        fields += [("VAE hash", files["vae"]["hash"]), ("VAE", files["vae"]["name"])]
    if files.get("embeddings"):
        fields.append(("TI hashes", ", ".join(f"{e['name']}: {e['hash']}" for e in files["embeddings"])))
    if request.layout.regions:
        fields.append(("Troupe regions", json.dumps([[r.label, list(r.box), r.layer] for r in request.layout.regions])))
    if request.relation:
        fields.append(("Troupe relation", f"{request.relation} ({request.relation_scale:g})"))
    if request.loras:  # A1111 writes its LoRAs into the prompt; a field keeps Troupe's prompt as it was typed
        fields.append(("LoRAs", " ".join(f"{Path(lora.path).stem}:{lora.scale:g}" for lora in request.loras)))
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields if value is not None)
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    return f"{request.prompt}{negative}\n{line}"


def model_files(request: GenerateRequest, bundle: Any) -> dict[str, Any]:
    """The VAE that replaced the model's own and the textual inversions the prompt or negative names, with A1111's
    short hashes (VAE: 10 hex digits of the file's sha256, an embedding: 12), so that a reused PNG can say which
    files it needs (engines/png_import.py's unloaded_files). A VAE folder's hash covers its files, as a model's."""
    files: dict[str, Any] = {}
    spec = getattr(bundle, "spec", None)
    if getattr(spec, "vae", None):
        vae = Path(spec.vae).expanduser()
        files["vae"] = {"name": vae.name, "hash": file_hash(vae)[:VAE_HASH]}
    used = []
    for embedding, pattern in _embedding_words(bundle):
        if pattern.search(request.prompt) or pattern.search(request.negative_prompt or ""):
            used.append(
                {"name": embedding.name, "file": embedding.path.name, "hash": file_hash(embedding.path)[:TI_HASH]}
            )
    if used:
        files["embeddings"] = used
    return files


def _embedding_words(bundle: Any) -> list[tuple[Any, re.Pattern]]:
    """Each loaded embedding with the pattern by which a prompt names it (engines/embeddings.EmbeddingWords)."""
    embeddings = tuple(getattr(bundle, "embeddings", ()) or ())
    if not embeddings:
        return []
    from engines.embeddings import EmbeddingWords  # torch: a bundle with embeddings has it loaded already

    return list(zip(embeddings, EmbeddingWords(embeddings).patterns))


def file_hash(path: Path) -> str:
    """The sha256 of a file, or of a folder's files (their relative names and contents), cached as model_hash's."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return _hash_files(path, ((path, *_stamp(path)),))
    inside = sorted(
        f for f in path.glob("**/*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    return _hash_files(path, tuple((f, *_stamp(f)) for f in inside))


def ran_sampler(key: str, bundle: Any) -> str:
    """The A1111 name of the sampler that runs `key` on this model ("default" runs the model's own scheduler, which
    is the pipeline's scheduler outside a generation: engines/generate.py swaps it only while denoising)."""
    scheduler = getattr(getattr(bundle, "pipe", None), "scheduler", None)
    config = dict(getattr(scheduler, "config", None) or {})
    return sampler_title(key, type(scheduler).__name__, config)


def model_name(source: str) -> str:
    """What A1111's `Model` field holds: a checkpoint's or folder's name (never the person's whole path), a Hub id."""
    path = Path(source).expanduser()
    if source == "demo" or not path.exists():
        return source
    return path.stem if path.is_file() else path.resolve().name


def model_hash(source: str) -> str | None:
    """A1111's `Model hash`: the first 10 hex digits of the sha256 of a checkpoint file. A diffusers folder has no
    one file, so its hash is taken over its components' files (names and contents); a Hub model's is the first 10
    digits of the cached revision (a commit id names the exact weights on the Hub). None when neither is known."""
    from engines.models import DEMO_MODEL_DIR  # torch: only when a PNG is written, never on import

    path = (DEMO_MODEL_DIR if source == "demo" else Path(source).expanduser()).resolve()
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else _component_files(path)
        return _hash_files(path, tuple((f, *_stamp(f)) for f in files))[:10]
    return _hub_revision(source)


def _component_files(folder: Path) -> list[Path]:
    """model_index.json and everything in the components' folders (a README or an adapter beside them is not the
    model)."""
    index = folder / "model_index.json"
    inside = [f for f in folder.glob("*/**/*") if f.is_file() and not any(p.startswith(".") for p in f.parts)]
    return sorted(([index] if index.is_file() else []) + inside)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _hash_files(root: Path, files: tuple[tuple[Path, int, int], ...]) -> str:
    """sha256 of one file, or of each file's relative name and sha256; cached on (size, mtime), since a checkpoint
    of several GB takes seconds to read."""
    if len(files) == 1 and files[0][0] == root:
        return _sha256(root)
    digest = hashlib.sha256()
    for file, _size, _mtime in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{_sha256(file)}\n".encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot of a Hub model (read from the local cache only: no network)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(cached, str):
        return None
    commit = Path(cached).parent.name  # .../snapshots/<commit>/model_index.json
    return commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else None


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
    image = source if isinstance(source, Image.Image) else open_image(Path(source))
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


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, Image.DecompressionBombError) as error:
        raise InputError(f"{path.name} is not a readable image ({error})") from error
