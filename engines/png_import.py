"""Open a PNG as a request: Troupe's own settings, or A1111's and ComfyUI's as a starting request.

A1111 writes one `parameters` text chunk (prompt, "Negative prompt: ...", then one line of `Key: value` fields);
ComfyUI writes the graph it ran as JSON in a `prompt` chunk (node id → class_type and inputs, where an input that
comes from another node is a link [node id, output index]). Both carry more than a Troupe request holds (hires fix,
clip skip, img2img, their own LoRA syntax); everything left out is named in `OpenedImage.dropped`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from engines.metadata import CHUNK, TI_HASH, VAE_HASH, file_hash, open_image, read_request
from engines.types import SCHEDULERS, GenerateRequest, InputError, ModelSpec
from engines.types.opened import ModelFile, OpenedImage
from engines.types.tables import sampler_key

# `Key: value` with A1111's quoting: a value holding a comma, a colon or a newline is written as a JSON string
_FIELD = re.compile(r'\s*(\w[\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# A1111's extra networks in a prompt, e.g. <lora:name:0.8>; Troupe's <subject> has no colon, so it is never one
_NETWORK = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^:>]*))?[^>]*>", re.IGNORECASE)
_QUIET = {
    "Version",
    "Model hash",
    "VAE",
    "VAE hash",
    "TI hashes",
}  # identify the image's origin; they are not settings to carry
_SAMPLERS = ("KSampler", "KSamplerAdvanced")
_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")
MAX_HOPS = 8  # links followed to find a value (a seed or a text from a primitive node)


def open_png(source: str | Path | Image.Image) -> OpenedImage:
    """The settings a PNG carries: Troupe's own chunk first (it holds the whole request), then A1111's, then
    ComfyUI's."""
    image = source if isinstance(source, Image.Image) else open_image(Path(source))
    chunks = {**getattr(image, "text", {}), **image.info}
    if CHUNK in chunks:
        return OpenedImage(read_request(image), "Troupe", files=_troupe_files(chunks[CHUNK]))
    if isinstance(chunks.get("parameters"), str):
        return from_a1111(chunks["parameters"])
    if isinstance(chunks.get("prompt"), str):
        return from_comfyui(chunks["prompt"])
    if isinstance(chunks.get("workflow"), str):
        return from_comfyui(json.dumps(workflow_graph(chunks["workflow"])))
    raise InputError("this image carries no settings Troupe can read (a PNG saved by Troupe, A1111 or ComfyUI)")


# ------------------------------------------------------------------------------------------------ VAE, embeddings
def unloaded_files(opened: OpenedImage, spec: ModelSpec) -> OpenedImage:
    """`opened` with the VAE and embeddings it was made with that `spec` does not load (by A1111's short hash when
    the image has one, else by name), so that reusing it never silently renders with other files."""
    if not opened.files:
        return opened
    loaded = [("VAE", Path(spec.vae).expanduser())] if spec.vae else []
    loaded += [("embedding", Path(e).expanduser()) for e in spec.embeddings]
    missing = tuple(f for f in opened.files if not any(_same(f, kind, path) for kind, path in loaded))
    return replace(opened, unloaded=missing)


def _same(wanted: ModelFile, kind: str, path: Path) -> bool:
    if wanted.kind != kind or not path.exists():
        return False
    if wanted.hash:
        return file_hash(path)[: len(wanted.hash)] == wanted.hash.lower()
    name = path.name if kind == "VAE" else path.stem
    return name.lower() == wanted.name.lower()


def _troupe_files(text: str) -> tuple[ModelFile, ...]:
    """The `model` section of Troupe's chunk (engines/metadata.model_files); an image from before it holds none."""
    try:
        model = json.loads(text).get("model") or {}
        vae = model.get("vae")
        files = [ModelFile("VAE", str(vae["name"]), vae.get("hash"))] if isinstance(vae, dict) else []
        files += [ModelFile("embedding", str(e["name"]), e.get("hash")) for e in model.get("embeddings") or ()]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, RecursionError):
        return ()  # read_request has already judged the chunk; a damaged model section only loses this check
    return tuple(files)


def _a1111_files(fields: dict[str, str]) -> tuple[ModelFile, ...]:
    """A1111's `VAE`, `VAE hash` and `TI hashes: "name: hash, name: hash"` fields."""
    files = []
    if fields.get("VAE") or fields.get("VAE hash"):
        files.append(ModelFile("VAE", fields.get("VAE") or "(unnamed)", _hex(fields.get("VAE hash"), VAE_HASH)))
    for item in (fields.get("TI hashes") or "").split(","):
        name, _, digest = item.strip().rpartition(":")
        if name.strip():
            files.append(ModelFile("embedding", name.strip(), _hex(digest, TI_HASH)))
    return tuple(files)


def _hex(text: str | None, digits: int) -> str | None:
    text = (text or "").strip().lower()
    return text[:digits] if re.fullmatch(r"[0-9a-f]{6,64}", text) else None


# ------------------------------------------------------------------------------------------------ A1111
def from_a1111(text: str) -> OpenedImage:
    lines = text.strip().split("\n")
    fields = _fields(lines[-1])
    if len(fields) >= 3:  # A1111 always writes at least Steps, Sampler, CFG scale, Seed and Size
        lines = lines[:-1]
    else:
        fields = {}
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if target is None and line.startswith("Negative prompt:"):
            target, line = negative_lines, line.removeprefix("Negative prompt:").strip()
        (prompt_lines if target is None else negative_lines).append(line)
    dropped: list[str] = []
    prompt = _strip_networks("\n".join(prompt_lines).strip(), dropped)
    negative = _strip_networks("\n".join(negative_lines).strip(), dropped)
    wanted: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "Steps":
            wanted["steps"] = _number(value, int, key, dropped)
        elif key == "CFG scale":
            wanted["cfg"] = _number(value, float, key, dropped)
        elif key == "Seed":
            wanted["seed"] = _number(value, int, key, dropped)
        elif key == "Size":
            width, _, height = value.partition("x")
            wanted["width"] = _number(width, int, key, dropped)
            wanted["height"] = _number(height, int, key, dropped)
        elif key == "Sampler":
            wanted["scheduler"] = _a1111_sampler(value, fields.get("Schedule type", ""), dropped)
        elif key == "Model" or (key == "Model hash" and "Model" not in fields):
            dropped.append(f"model {value} (load it with --model)")
        elif key not in _QUIET and key != "Schedule type":
            dropped.append(f"{key}: {_short(value)}")
    request = _request(prompt, negative, wanted, dropped)
    return OpenedImage(request, "A1111", tuple(dropped), files=_a1111_files(fields))


def _fields(line: str) -> dict[str, str]:
    fields = {}
    for key, value in _FIELD.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key.strip()] = str(value)
    return fields


def _a1111_sampler(name: str, schedule: str, dropped: list[str]) -> str | None:
    """A1111 ≥ 1.9 writes the schedule apart ("DPM++ 2M" + "Schedule type: Karras"); older ones in the name."""
    schedule = schedule.strip()
    if schedule.lower() == "karras":
        key = sampler_key(f"{name} Karras")
        if key is not None:
            return key
    if schedule and schedule.lower() not in ("automatic", "karras"):
        dropped.append(f"schedule type {schedule}")
    key = sampler_key(name)
    if key is None or (schedule.lower() == "karras" and not SCHEDULERS[key].karras):
        dropped.append(f"sampler {name}{' ' + schedule if schedule.lower() == 'karras' else ''} (not in Troupe)")
    return key


def _strip_networks(prompt: str, dropped: list[str]) -> str:
    """A1111's <lora:name:weight> tags out of the prompt, each named (Troupe takes LoRA files with --lora / the UI)."""
    for kind, name, weight in _NETWORK.findall(prompt):
        dropped.append(f"{kind.lower()} {name}" + (f" ({weight})" if weight else "") + " (add its file as a LoRA)")
    return re.sub(r" {2,}", " ", _NETWORK.sub(" ", prompt)).strip() if _NETWORK.search(prompt) else prompt


# ------------------------------------------------------------------------------------------------ ComfyUI
def from_comfyui(text: str) -> OpenedImage:
    try:
        graph = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"this image's ComfyUI graph is damaged ({type(error).__name__})") from error
    if not isinstance(graph, dict) or not all(isinstance(n, dict) for n in graph.values()):
        raise InputError("this image's ComfyUI graph is not a graph of nodes")
    samplers = sorted((nid for nid, n in graph.items() if n.get("class_type") in _SAMPLERS), key=_node_order)
    if not samplers:
        raise InputError("this ComfyUI image has no KSampler node: Troupe can only start from a sampler's settings")
    # The first pass starts from an empty latent; later passes (hires fix, refiner) refine its output.
    first = next((s for s in samplers if _kind(graph, _input(graph[s], "latent_image")) in _LATENTS), samplers[0])
    inputs = graph[first].get("inputs", {})
    dropped: list[str] = []
    wanted: dict[str, Any] = {
        "seed": _number(_value(graph, inputs.get("seed", inputs.get("noise_seed"))), int, "seed", dropped),
        "steps": _number(_value(graph, inputs.get("steps")), int, "steps", dropped),
        "cfg": _number(_value(graph, inputs.get("cfg")), float, "cfg", dropped),
    }
    sampler, schedule = _value(graph, inputs.get("sampler_name")), _value(graph, inputs.get("scheduler"))
    wanted["scheduler"] = _comfy_sampler(str(sampler), str(schedule), dropped)
    prompt = _text(graph, inputs.get("positive"), "positive prompt", dropped)
    negative = _text(graph, inputs.get("negative"), "negative prompt", dropped)
    latent = _input(graph[first], "latent_image")
    if _kind(graph, latent) in _LATENTS:
        size = graph[latent[0]].get("inputs", {})
        wanted["width"] = _number(_value(graph, size.get("width")), int, "width", dropped)
        wanted["height"] = _number(_value(graph, size.get("height")), int, "height", dropped)
        wanted["num_images"] = _number(_value(graph, size.get("batch_size", 1)), int, "batch size", dropped)
    else:
        dropped.append(f"start image ({_kind(graph, latent) or 'unknown'} node)")
    denoise = _value(graph, inputs.get("denoise", 1.0))
    if isinstance(denoise, (int, float)) and denoise < 1:
        dropped.append(f"denoise {denoise:g}")
    dropped += _comfy_extras(graph, samplers)
    return OpenedImage(_request(prompt, negative, wanted, dropped), "ComfyUI", tuple(dropped))


def workflow_graph(text: str) -> dict[str, Any]:
    """ComfyUI's editor graph (the `workflow` chunk: nodes with positional `widgets_values`, and links by id) as the
    `prompt` graph it would run, for the node types Troupe reads; used when a PNG carries only the workflow."""
    try:
        workflow = json.loads(text)
        links = {link[0]: [str(link[1]), link[2]] for link in workflow.get("links") or []}
        graph = {}
        for node in workflow["nodes"]:
            kind = node.get("type", "")
            values = node.get("widgets_values") or []
            inputs = dict(zip(WIDGETS.get(kind, ()), values if isinstance(values, list) else []))
            for slot in node.get("inputs") or []:
                if slot.get("link") in links:
                    inputs[slot["name"]] = links[slot["link"]]
            graph[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise InputError(f"this image's ComfyUI workflow is damaged ({type(error).__name__})") from error
    return graph


# The widgets of the node types Troupe reads, in the order ComfyUI's editor stores their values
# (`control_after_generate` follows every seed widget).
WIDGETS = {
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"),
    "CLIPTextEncode": ("text",),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "PrimitiveNode": ("value",),
}  # fmt: skip


def _comfy_sampler(sampler: str, schedule: str, dropped: list[str]) -> str | None:
    karras = schedule == "karras"
    matches = [k for k, s in SCHEDULERS.items() if s.comfyui == sampler]
    exact = [k for k in matches if SCHEDULERS[k].karras == karras]
    if not matches:
        dropped.append(f"sampler {sampler} (not in Troupe)")
        return None
    if not exact or schedule not in ("normal", "karras", "simple", "ddim_uniform", "sgm_uniform"):
        dropped.append(f"scheduler {schedule}")
    return (exact or matches)[0]


def _comfy_extras(graph: dict[str, Any], samplers: list[str]) -> list[str]:
    """The model, LoRAs and further sampler passes of the graph: named, since the request cannot hold them."""
    notes = []
    for node in (graph[k] for k in sorted(graph, key=_node_order)):
        inputs, kind = node.get("inputs", {}), node.get("class_type", "")
        if "ckpt_name" in inputs:
            notes.append(f"model {inputs['ckpt_name']} (load it with --model)")
        elif "lora_name" in inputs:
            notes.append(f"lora {inputs['lora_name']} ({inputs.get('strength_model', 1)}) (add its file as a LoRA)")
        elif kind == "CLIPSetLastLayer":
            notes.append(f"clip skip ({inputs.get('stop_at_clip_layer')})")
    if len(samplers) > 1:
        notes.append(f"{len(samplers) - 1} more sampler pass(es) (hires fix or refiner)")
    return notes


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if str(node_id).isdigit() else (1 << 62, str(node_id))


def _input(node: dict[str, Any], name: str) -> Any:
    return node.get("inputs", {}).get(name)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _kind(graph: dict[str, Any], link: Any) -> str | None:
    return graph.get(str(link[0]), {}).get("class_type") if _is_link(link) else None


def _value(graph: dict[str, Any], value: Any) -> Any:
    """A literal input, or the literal behind a chain of links (a primitive node, a seed node)."""
    for _ in range(MAX_HOPS):
        if not _is_link(value):
            return value
        inputs = graph.get(str(value[0]), {}).get("inputs", {})
        literals = [v for k, v in inputs.items() if k in ("value", "seed", "noise_seed", "int", "float", "string")]
        value = literals[0] if literals else None
    return None


def _text(graph: dict[str, Any], link: Any, what: str, dropped: list[str]) -> str:
    """The text of the conditioning node a sampler's positive or negative input comes from (CLIPTextEncode, or
    SDXL's with `text_g`)."""
    if not _is_link(link):
        return ""
    inputs = graph.get(str(link[0]), {}).get("inputs", {})
    for name in ("text", "text_g", "string"):
        text = _value(graph, inputs.get(name))
        if isinstance(text, str):
            return text
    dropped.append(f"{what} (made by a {_kind(graph, link)} node)")
    return ""


# ------------------------------------------------------------------------------------------------ shared
def _number(value: Any, kind: type, what: str, dropped: list[str]) -> int | float | None:
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):
        if value is not None:
            dropped.append(f"{what} {_short(str(value))} (not a number)")
        return None
    return number


def _request(prompt: str, negative: str, wanted: dict[str, Any], dropped: list[str]) -> GenerateRequest:
    """A request from the values that fit one: each value Troupe refuses (a size not a multiple of 8, more steps
    than its limit) is named and left at Troupe's default instead."""
    if not prompt.strip():
        raise InputError("this image's prompt is empty (or made by nodes Troupe cannot read)")
    request = GenerateRequest(prompt, negative_prompt=negative)
    for name, value in wanted.items():
        if value is None:
            continue
        try:
            request = replace(request, **{name: value})
        except InputError as error:
            dropped.append(f"{name} {value} ({error})")
    return request


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
