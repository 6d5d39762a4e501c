"""Resumable training checkpoints, shared by subject registration and the demo model's trainer.

A checkpoint is a folder holding two files:

    state.safetensors  every tensor: module weights "<module>.<name>", optimizer tensors "optimizer.<param>.<name>"
                       (AdamW's moments and step), generator states "rng.<generator>"; its header holds the token
    state.json         {"key", "token", "step", "param_groups", "optimizer_scalars", "grad_scaler", "extra"}

Each file is written under a temporary name and moved into place with os.replace, so a reader sees an old file or a
new one, never half of one; both are written before either moves, so a full disk leaves the previous checkpoint
whole and ends in one line (InputError) saying nothing was changed. `key` says whose state it is (a registration request, a training recipe): a checkpoint
with another key is ignored rather than loaded into the wrong run. `token` is new on every save and written into
both files, so a pair split by a crash between the two moves (new tensors, old JSON) is ignored too, as is a file
that cannot be read. Nothing is unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engines.atomic import write_error
from engines.faults import fault_point

TENSORS = "state.safetensors"
META = "state.json"


@dataclass(frozen=True)
class TrainingState:
    """The live objects a checkpoint is saved from and restored into (restoring changes them in place)."""

    modules: Mapping[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)
    grad_scaler: torch.amp.GradScaler | None = None

    def __post_init__(self) -> None:
        for name in [*self.modules, *self.generators]:
            if not name or "." in name or name in ("optimizer", "rng"):
                raise ValueError(f"checkpoint part name {name!r}: use a non-empty name without dots")


@dataclass(frozen=True)
class Restored:
    step: int
    extra: dict[str, Any]  # what the trainer saved beside the state (loss curve, elapsed time...)


def _optimizer_parts(state: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """An optimizer's per-parameter state split into tensors (for safetensors) and plain values (for JSON): 8-bit
    AdamW keeps some of its state as Python numbers."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state.items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, scalars


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]) -> dict[int, dict]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in scalars.items():
        state.setdefault(int(pid), {}).update(entries)
    return state


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    key: str

    def save(self, state: TrainingState, step: int, extra: dict[str, Any] | None = None) -> None:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tensors: dict[str, torch.Tensor] = {}
        for module_name, module in state.modules.items():
            for name, value in module.state_dict().items():
                tensors[f"{module_name}.{name}"] = value.detach().cpu().contiguous()
        optimizer = state.optimizer.state_dict()
        optimizer_tensors, scalars = _optimizer_parts(optimizer["state"])
        tensors.update(optimizer_tensors)
        for name, generator in state.generators.items():
            tensors[f"rng.{name}"] = generator.get_state().cpu()
        scaler = state.grad_scaler.state_dict() if state.grad_scaler is not None else None
        meta = {
            "key": self.key,
            "token": token,
            "step": step,
            "param_groups": optimizer["param_groups"],
            "optimizer_scalars": scalars,
            "grad_scaler": scaler,
            "extra": extra or {},
        }
        # both files are written in full before either moves in: a disk that fills up (the tensors are the big
        # part) fails a write, and the previous checkpoint is still whole beside the removed parts
        try:
            save_file(tensors, str(_part(folder / TENSORS)), metadata={"token": token})
            fault_point("checkpoint.save.writing")
            _part(folder / META).write_text(json.dumps(meta, default=float))
        except OSError as error:
            for path in (folder / TENSORS, folder / META):
                _part(path).unlink(missing_ok=True)
            raise write_error("the training checkpoint", error) from None
        os.replace(_part(folder / TENSORS), folder / TENSORS)
        fault_point("checkpoint.save.between")  # new tensors, old JSON: load() sees two tokens and starts over
        os.replace(_part(folder / META), folder / META)
        fault_point("checkpoint.saved")

    def load(self, state: TrainingState) -> Restored | None:
        """Restore `state` from the checkpoint and say where it stopped; None (nothing changed) when there is no
        usable checkpoint of this key."""
        folder = Path(self.folder)
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("key") != self.key:
                return None  # another run's state
            with safe_open(str(folder / TENSORS), framework="pt") as file:
                if (file.metadata() or {}).get("token") != meta.get("token"):
                    return None  # the two files are from different saves: a save was cut short
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except (OSError, ValueError, SafetensorError):  # missing, unreadable or damaged: start over
            return None
        for module_name, module in state.modules.items():
            prefix = f"{module_name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state.optimizer.load_state_dict(
            {"state": _optimizer_state(tensors, meta["optimizer_scalars"]), "param_groups": meta["param_groups"]}
        )
        for name, generator in state.generators.items():
            generator.set_state(tensors[f"rng.{name}"])
        if state.grad_scaler is not None and meta.get("grad_scaler"):
            state.grad_scaler.load_state_dict(meta["grad_scaler"])
        return Restored(int(meta["step"]), dict(meta.get("extra") or {}))
