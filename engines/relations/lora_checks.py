"""The checks a relation's LoRA file passes before the relation library takes it in (RelationLibrary.import_file).

A generation merges each module's ΔW = (α/r)·B·A into the cross-attention's projections (engines/loras.py). An
imported file with a NaN, an inf or a 1e30 there turns every picture that asks for the relation into noise or black,
and a tensor of the wrong shape or a non-scalar α stops the generation with a traceback: far from the import that
caused it. So the file is refused at the import, in one line naming the tensor. What a relation LoRA holds is known
exactly (engines/relations/training.py): A (r, in) and B (out, r) on attn2.to_q/to_k/to_v/to_out.0 of the UNet, in
diffusers' keys or kohya's (with an α per module), r the card's rank, all to_k/to_v reading one text width.
Whether the modules and the widths fit the loaded model is checked when a generation asks for the relation
(engines/loras.py check_family): the card's family cannot say it (tiny test models of the SD 1.5 family are 32 wide).
"""

from __future__ import annotations

import re

import torch

from engines.types import InputError

DIFFUSERS = re.compile(r"unet\.(?P<block>[\w.]+\.attn2)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<part>lora_A|lora_B)\.weight")  # fmt: skip
KOHYA = re.compile(r"lora_unet_(?P<block>\w+_attn2)_(?P<proj>to_q|to_k|to_v|to_out_0)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")  # fmt: skip
PARTS = {"lora_A": "down", "lora_B": "up", "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
MAX_ABS = 1e3  # trained relation LoRAs stay far below 1 (B starts at zero); 1e3 in A and B is already a ΔW of 1e6·r
MAX_KEYS = 3 * 4 * 200  # SDXL has 70 cross-attention blocks: 4 projections, 3 tensors each, with room to spare
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_relation_lora(handle, keys: list[str], rank: int, name: str) -> None:
    """Refuse (one InputError line) a relation LoRA a generation could not merge sanely; `handle` is safe_open's."""
    if len(keys) > MAX_KEYS:
        raise InputError(f"{name}: holds {len(keys)} tensors, more than a relation LoRA has")
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in keys:
        match = DIFFUSERS.fullmatch(key) or KOHYA.fullmatch(key)
        if match is None:
            raise InputError(f"{name}: holds {key[:80]!r}, which is not a relation LoRA's weight (A/B or "
                             "lora_down/lora_up of the UNet's attn2 to_q, to_k, to_v, to_out.0)")  # fmt: skip
        block, projection = match["block"].replace(".", "_"), match["proj"].replace(".", "_")
        modules.setdefault((block, projection), {})[PARTS[match["part"]]] = _tensor(handle, key, name)
    if len({key[:5] for key in keys}) > 1:
        raise InputError(f"{name}: mixes diffusers' and kohya's key names")
    widths: dict[str, set[int]] = {}
    for (block, projection), parts in sorted(modules.items()):
        where = f"{name}: {block}.{projection}"
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            raise InputError(f"{where} has {'no down (A)' if down is None else 'no up (B)'} weight")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != rank or up.shape[1] != rank or 0 in down.shape + up.shape:
            raise InputError(f"{where}: A {tuple(down.shape)} and B {tuple(up.shape)} are not (rank, in) and "
                             f"(out, rank) with the card's rank {rank}")  # fmt: skip
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1 or alpha.ndim > 1 or not 0 < float(alpha) <= MAX_ABS:
                raise InputError(f"{where}: its alpha must be one number in (0, {MAX_ABS:g}]")
        text = projection in ("to_k", "to_v")
        if text:
            widths.setdefault("text", set()).add(down.shape[1])  # one text encoder: one width for all of them
        # one width per attention block: the query's channels, the projections' outputs, the output's input
        widths.setdefault(block, set()).update({up.shape[0]} if text else {up.shape[0], down.shape[1]})
    if not modules:
        raise InputError(f"{name}: holds no LoRA weights")
    for block, found in widths.items():
        if len(found) > 1:
            raise InputError(f"{name}: {block} has projections of different widths ({sorted(found)}): not the "
                             "shapes of one attention layer")  # fmt: skip


def _tensor(handle, key: str, name: str) -> torch.Tensor:
    """The tensor, refused unless it is made of finite numbers no larger than MAX_ABS."""
    tensor = handle.get_tensor(key)
    alpha = key.endswith(".alpha")
    if tensor.dtype not in FLOATS and not (alpha and tensor.dtype in (torch.int64, torch.int32)):
        raise InputError(f"{name}: {key} is {str(tensor.dtype).removeprefix('torch.')}, not floating point")
    values = tensor.double()
    if not torch.isfinite(values).all():
        raise InputError(f"{name}: {key} holds NaN or infinite values")
    if values.numel() and values.abs().max() > MAX_ABS:
        raise InputError(f"{name}: {key} holds values beyond ±{MAX_ABS:g} ({values.abs().max().item():.3g})")
    return tensor
