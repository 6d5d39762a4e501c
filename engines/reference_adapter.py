"""The reference adapter (SynCD §4.2): a LoRA on every self-attention's q, k, v and out projections, trained so
that the target copies what it reads from the references (engines/reference_training.py).

It lives in the UNet as a peft adapter named "reference", switched off except during the target's calls of a
request that reads references — the reference pass runs without it, as in SynCD — so a request without
references is bit-identical to a UNet that never had it. On disk it is one `.safetensors` file: the LoRA weights,
with its rank, alpha and a card (what it was trained on, and how) in the file's metadata. Nothing else is read, so
no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engines.types import InputError

# peft is imported inside the functions that use it: engines/references.py asks has_adapter() on every request
ADAPTER_NAME = "reference"  # the peft adapter's name in the UNet
TARGET_MODULES = r".*attn1\.(to_q|to_k|to_v|to_out\.0)"  # SynCD: LoRA on self-attention only


def has_adapter(unet) -> bool:
    """Whether the UNet carries a reference adapter."""
    return ADAPTER_NAME in (getattr(unet, "peft_config", None) or {})


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 16
    alpha: float = 16.0

    def lora(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=TARGET_MODULES, init_lora_weights=True)


def add_adapter(unet, settings: AdapterSettings) -> None:
    """A fresh (zero-effect) adapter to train, switched off."""
    unet.add_adapter(settings.lora(), adapter_name=ADAPTER_NAME)
    unet.disable_adapters()


def load_adapter(unet, path: str | Path) -> dict:
    """Attach the adapter in the .safetensors file `path` (switched off) and return its card."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise InputError(f"reference adapter {path} is not a .safetensors file")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "rank" not in metadata or "alpha" not in metadata:
        raise InputError(f"{path} is not a Troupe reference adapter (no rank and alpha in its metadata)")
    from peft.utils import set_peft_model_state_dict

    add_adapter(unet, AdapterSettings(int(metadata["rank"]), float(metadata["alpha"])))
    result = set_peft_model_state_dict(unet, load_file(str(path)), adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ADAPTER_NAME in k and "lora" in k]
    if result.unexpected_keys or missing:
        unet.delete_adapters(ADAPTER_NAME)
        raise InputError(f"{path} does not fit this model's self-attention "
                         f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors)")  # fmt: skip
    return json.loads(metadata.get("card", "{}"))


def save_adapter(unet, path: str | Path, settings: AdapterSettings, card: dict) -> None:
    """Write the adapter atomically (a crash leaves the previous file whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    state = {key: value.detach().contiguous().cpu() for key, value in weights.items()}
    metadata = {"rank": str(settings.rank), "alpha": str(settings.alpha), "card": json.dumps(card)}
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)
