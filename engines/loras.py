"""LoRA files — Troupe's relation LoRAs and the ones people bring from A1111/ComfyUI — read, checked and applied for
one request.

Reading goes through diffusers: `lora_state_dict` of the loaded pipeline's class turns kohya's and diffusers' formats
(and SDXL's LDM-named kohya keys) into diffusers' names, and its key converters give peft's `<module>.lora_A/B`.
What is left is arithmetic: a module's update is ΔW = scale · (α/r) · B·A (a 1×1 `up` times a k×k `down` for
kohya's convolution LoRAs).

Applying is by hand, on purpose: the update is added to the weights for the request and the saved weights are put
back afterwards, bit for bit. diffusers' fuse/unfuse subtracts again (not exact), and peft's switchable adapters
would compete with the reference adapter's per-call switch (engines/references.py) and add two matmuls per projection
at every step; merged weights cost nothing per step. A layer quantized by torchao (weight-only int8) is merged by
swapping its weight for the float dequantized weight plus the update for the request (the quantized tensor goes
back afterwards, the same object); bitsandbytes' int8/nf4 layers run their own kernels on their own parameter types,
which a float weight cannot stand in for, so LoRAs on them are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engines.types import InputError, LoraRef

BITSANDBYTES_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' parameter types (int8/nf4 quantization)
PARTS = ("unet", "text_encoder", "text_encoder_2")  # where a LoRA's modules live in a pipeline
FAMILY_BY_CONTEXT = {768: "SD 1.5", 1024: "SD 2.x", 2048: "SDXL"}  # the cross-attention's text width
FAMILY_NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "demo": "the demo model"}


@dataclass(frozen=True)
class LoraUpdate:
    part: str  # one of PARTS
    module: str  # the module's name inside that part
    down: torch.Tensor  # (r, in) or (r, in, k, k): peft's lora_A
    up: torch.Tensor  # (out, r) or (out, r, 1, 1): peft's lora_B
    scale: float  # α / r


def read_lora(path: str | Path, pipeline_class: type) -> tuple[LoraUpdate, ...]:
    """The updates in a LoRA file; cached per file content (path, size, mtime)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        raise InputError(f"LoRA {path}: no such .safetensors file (Troupe never reads pickled .ckpt/.pt weights)")
    stat = path.stat()
    return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, pipeline_class)


@lru_cache(maxsize=16)
def _read_cached(path: str, _size: int, _mtime: int, pipeline_class: type) -> tuple[LoraUpdate, ...]:
    name = Path(path).name
    try:
        with safe_open(path, "pt") as handle:
            raw_keys = list(handle.keys())
        state, alphas = pipeline_class.lora_state_dict(path)[:2]
    except (SafetensorError, OSError) as error:
        raise InputError(f"LoRA {name}: not a readable safetensors file ({error})") from None
    except (ValueError, KeyError) as error:
        raise InputError(f"LoRA {name}: not a LoRA diffusers can read ({error})") from None
    if (
        any("lora_te2_" in k or k.startswith("text_encoder_2.") for k in raw_keys)
        and "XL" not in pipeline_class.__name__
    ):
        raise InputError(f"LoRA {name} is for SDXL (it has a second text encoder); the loaded model is not")
    updates = []
    for part in PARTS:
        prefix = f"{part}."
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        part_alphas = {k[len(prefix) :]: float(v) for k, v in (alphas or {}).items() if k.startswith(prefix)}
        updates += _updates(part, tensors, part_alphas, name)
    if not updates:
        raise InputError(f"LoRA {name}: holds no LoRA weights Troupe can apply (LoRA up/down pairs)")
    return tuple(updates)


def _updates(part: str, tensors: dict, alphas: dict, name: str) -> list[LoraUpdate]:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    def to_peft(found: dict) -> dict:
        if part == "unet":
            return convert_unet_state_dict_to_peft(found)
        if any("_lora." in k for k in found):
            return convert_state_dict_to_peft(found, original_type=StateDictType.DIFFUSERS_OLD)
        if any("lora_linear_layer" in k for k in found):
            return convert_state_dict_to_peft(found, original_type=StateDictType.DIFFUSERS)
        return found

    peft = to_peft(tensors)
    alpha_of = {}  # module → α, from keys named like the down weight they belong to ("….down.weight.alpha")
    for key, alpha in alphas.items():
        converted = to_peft({key.removesuffix(".alpha"): torch.zeros(())})
        alpha_of[_module(next(iter(converted)))] = alpha
    extra = [k for k in peft if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        raise InputError(f"LoRA {name}: holds weights Troupe cannot apply ({extra[0]}: DoRA, LoHa and LoKr are not "
                         "supported)")  # fmt: skip
    updates = []
    for key in sorted(k for k in peft if k.endswith(".lora_A.weight")):
        module = _module(key)
        down, up = peft[key].float(), peft.get(f"{module}.lora_B.weight")
        if up is None:
            raise InputError(f"LoRA {name}: {module} has a down weight but no up weight")
        rank = down.shape[0]
        updates.append(LoraUpdate(part, module, down, up.float(), alpha_of.get(module, rank) / rank))
    return updates


def _module(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def check_family(updates: Sequence[LoraUpdate], bundle, name: str) -> None:
    """One line naming both families when a LoRA was made for another kind of model than the loaded one."""
    unet = bundle.pipe.unet
    model_width = unet.config.cross_attention_dim
    widths = {u.down.shape[1] for u in updates if u.part == "unet" and u.module.endswith("attn2.to_k")}
    model_family = FAMILY_NAMES.get(bundle.family, bundle.family)
    if widths and model_width not in widths:
        width = widths.pop()
        theirs = FAMILY_BY_CONTEXT.get(width, f"a model with {width}-wide text conditioning")
        raise InputError(f"LoRA {name} is for {theirs}; the loaded model is {model_family}")
    for update in updates:
        target = _target(bundle, update)
        if target is None or _delta(update, 1.0).shape != target.weight.shape:
            raise InputError(f"LoRA {name} does not fit {model_family}: it changes {update.part}.{update.module}, "
                             "which this model does not have in that shape")  # fmt: skip


def _target(bundle, update: LoraUpdate) -> torch.nn.Module | None:
    """The layer an update changes; under a peft wrapper (the reference adapter) that is its base layer."""
    part = getattr(bundle.pipe, update.part, None)
    if part is None:
        return None
    modules = dict(part.named_modules())
    module = modules.get(update.module) or modules.get(update.module.removeprefix("text_model."))
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else None


def _delta(update: LoraUpdate, scale: float) -> torch.Tensor:
    """ΔW = scale · α/r · B·A, in the layer's weight shape."""
    down, up = update.down.flatten(1), update.up.flatten(1)  # (r, in·k·k), (out, r)
    delta = up @ down * (scale * update.scale)  # (out, in·k·k)
    return delta.view(up.shape[0], *update.down.shape[1:]) if update.down.ndim == 4 else delta


def lora_updates(bundle, loras: Sequence[LoraRef]) -> list[tuple[tuple[LoraUpdate, ...], float]]:
    """Each LoRA of a request read and checked against the loaded model, before any work."""
    found = []
    for lora in loras:
        updates = read_lora(lora.path, type(bundle.pipe))
        _refuse_bitsandbytes(updates, bundle, Path(lora.path).name)
        check_family(updates, bundle, Path(lora.path).name)
        found.append((updates, lora.scale))
    return found


def _refuse_bitsandbytes(updates: Sequence[LoraUpdate], bundle, name: str) -> None:
    for update in updates:
        part = getattr(bundle.pipe, update.part, None)
        if part is not None and any(type(p).__name__ in BITSANDBYTES_WEIGHTS for p in part.parameters()):
            raise InputError(f"LoRA {name}: LoRAs cannot be merged into a bitsandbytes int8/nf4 {update.part}; use "
                             "quantization torchao-int8 or none to apply them")  # fmt: skip


def _is_quantized(weight: torch.Tensor) -> bool:
    """A torchao weight: a tensor subclass that dequantizes (bitsandbytes' are refused before any merge)."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize")


@contextmanager
def applied(bundle, loras: Sequence[tuple[Sequence[LoraUpdate], float]]) -> Iterator[None]:
    """The LoRAs merged into the weights for the duration of the block; afterwards the weights are the saved ones,
    bit for bit, whatever happened inside."""
    saved: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for updates, scale in loras:
                for update in updates:
                    layer = _target(bundle, update)
                    if id(layer) not in saved:
                        weight = layer.weight
                        if _is_quantized(weight):  # the request runs on the float weight; the int8 one waits
                            saved[id(layer)] = (layer, weight)
                            layer._parameters["weight"] = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
                        else:
                            saved[id(layer)] = (layer, weight.detach().clone())
                    delta = _delta(update, scale).to(layer.weight.device)
                    layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.values():
                if _is_quantized(weight):
                    layer._parameters["weight"] = weight  # the very tensor it had: bit for bit
                else:
                    layer.weight.copy_(weight)
