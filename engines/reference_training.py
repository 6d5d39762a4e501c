"""Training the reference adapter (SynCD §4.2): a LoRA on self-attention that learns to copy from references.

Each step takes a batch of dataset objects (engines/reference_dataset.py); for each, one image is the target and
k other images of the same object (k = 1 … max_references, one k per step) are its references. As at generation:

1. target and references are noised to the same t, the references with their own fresh noise;
2. the references run through the UNet with the adapter off and no gradient, prompt "a photo of a {class}",
   each self-attention layer keeping its input (kernels/reference_attention.py, grouped per target);
3. the target runs with the adapter on; its self-attention reads its own references' foreground (dilated masks),
   and only from the cells of the object's box — the same routing a region gets at generation;
4. the loss is the target's denoising loss alone, ‖ε − ε_θ(x_t, t, c, refs)‖² (v-prediction models: v).

Captions name the object by its class word, so its look can only come from the references; one in ten is empty,
which teaches the image-only branch SynCD's image guidance uses. State is saved every `save_every` steps (the
adapter as safetensors, the optimiser beside it), and a run resumes from it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engines.reference_adapter import ADAPTER_NAME, AdapterSettings, add_adapter, save_adapter
from engines.reference_batches import ReferenceBatches, reference_pass, target_pass
from engines.reference_dataset import ReferenceDataset
from engines.types import Cancelled, StepProgress
from kernels.reference_attention import ReferenceState, install_references


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    batch: int = 16
    learning_rate: float = 5e-4
    rank: int = 16
    max_references: int = 2
    save_every: int = 100
    validation_share: float = 0.05  # the last objects of the dataset, never trained on
    seed: int = 0


def train_adapter(bundle, dataset: ReferenceDataset, out: str | Path, settings: TrainSettings,
                  on_progress: Callable[[StepProgress], None] | None = None, cancel=None,
                  threads: int | None = None) -> dict:  # fmt: skip
    """Train (or resume) the adapter into `out` (.safetensors); returns the card written with it."""
    if threads:
        torch.set_num_threads(threads)
    out, unet = Path(out), bundle.pipe.unet
    batches = ReferenceBatches(bundle, dataset, settings.validation_share, settings.max_references)
    adapter = AdapterSettings(settings.rank, float(settings.rank))
    add_adapter(unet, adapter)
    unet.requires_grad_(False)
    trainable = [p for name, p in unet.named_parameters() if "lora_" in name and ADAPTER_NAME in name]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    step = _resume(unet, optimiser, out)
    state = ReferenceState({}, rows=0, mode="off")
    previous = install_references(unet, state)
    generator = torch.Generator("cpu").manual_seed(settings.seed + step)
    rng = random.Random(settings.seed * 1_000_003 + step)
    started, losses = time.perf_counter(), []
    try:
        while step < settings.steps:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            batch = batches.sample(settings.batch, rng.randint(1, settings.max_references), rng, generator)
            losses.append(_train_step(unet, state, batch, optimiser, trainable))
            step += 1
            if on_progress is not None:
                on_progress(StepProgress(step, settings.steps, time.perf_counter() - started, loss=losses[-1]))
            if step % settings.save_every == 0:
                _save(
                    unet,
                    optimiser,
                    out,
                    adapter,
                    settings,
                    step,
                    losses[-settings.save_every :],
                    dataset,
                    batches,
                    state,
                )
        return _save(
            unet, optimiser, out, adapter, settings, step, losses[-settings.save_every :], dataset, batches, state
        )
    finally:
        unet.set_attn_processor(previous)
        unet.disable_adapters()


def _train_step(unet, state: ReferenceState, batch, optimiser, trainable) -> float:
    """One step of 1.–4. above; the loss."""
    unet.train()
    reference_pass(unet, state, batch)
    prediction = target_pass(unet, state, batch)
    loss = F.mse_loss(prediction.float(), batch.target.float())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimiser.step()
    return loss.item()


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".optimiser.safetensors")


def _resume(unet, optimiser, out: Path) -> int:
    """The step to continue from: 0, or the one saved beside `out` (the adapter weights and the optimiser)."""
    path = _state_path(out)
    if not (out.is_file() and path.is_file()):
        return 0
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(unet, load_file(str(out)), adapter_name=ADAPTER_NAME)
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():  # "{parameter index}.{exp_avg|exp_avg_sq|step}"
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = value
    current = optimiser.state_dict()  # its param_groups come from the settings, as when the run began
    optimiser.load_state_dict({"state": per_parameter, "param_groups": current["param_groups"]})
    with safe_open(str(path), "pt") as handle:
        return int(handle.metadata()["step"])


def _save(unet, optimiser, out: Path, adapter: AdapterSettings, settings: TrainSettings, step: int,
          recent: list[float], dataset: ReferenceDataset, batches: ReferenceBatches, state) -> dict:  # fmt: skip
    """The adapter, its card (with the held-out losses now) and the optimiser, each written atomically."""
    validation = batches.validation_losses(unet, state)
    card = {
        "trained_on": f"{dataset.source} ({len(dataset.objects)} objects, {dataset.root.name})",
        "settings": asdict(settings),
        "step": step,
        "recent_loss": round(sum(recent) / max(len(recent), 1), 5),
        "validation_loss": validation,
    }
    save_adapter(unet, out, adapter, card)
    # the optimiser's moments as safetensors too (no pickle anywhere): one tensor per parameter index and name
    moments = {f"{index}.{name}": value.detach().contiguous().cpu()
               for index, entry in optimiser.state_dict()["state"].items() for name, value in entry.items()}  # fmt: skip
    partial = _state_path(out).with_name(_state_path(out).name + ".partial")
    save_file(moments, str(partial), metadata={"step": str(step)})
    partial.replace(_state_path(out))
    return card
