"""Subject registration: Cones 2 residual token embeddings (papers/cones2.txt §3.2, Eq. 2–6).

A copy of the text encoder(s) E^custom is fine-tuned on the subject's photos with

    L = L_sub + λ·L_reg                                                    (Eq. 4)
    L_sub = E_{x,ε,t} w·‖ε_θ(x_t, c, t) − target‖²                         (Eq. 2; target ε or v)
    c = E("a photo of {class}") with its class-word rows taken from E^custom("a photo of {class}")
    L_reg = E_{c∈C_class} mean_{p∈c, p≠class} ‖E^custom(c)_p − E(c)_p‖²  (Eq. 3)

and the subject is stored as Δ = mean_{c∈C_class} (E^custom(c)_class − E(c)_class)        (Eq. 5)
one (n_class_tokens, width) float32 tensor per text encoder; generation adds it at the class-word tokens (Eq. 6).
c is the condition that Eq. 6 builds at generation, so the photos can only be learned where Δ keeps them
(condition.SplicedCondition says why Eq. 2 read literally loses the subject). Unlike the public Cones 2 code (which
pins only the BOS and EOS outputs of the single instance prompt, notes §1.2), L_reg here runs over a bank of ≥1,000
template sentences with the class word and pins every other position, padding included (the UNet attends to all 77).

    bank.py       the sentence bank C_class and its tokenization
    condition.py  the encoder outputs the UNet reads, and the spliced condition of L_sub
    backbone.py   the frozen UNet and VAE, and the precision they run in
    data.py       everything encoded once before the first step
    trainer.py    the loop (Eq. 2–4), Δ (Eq. 5) and the run's measurements
    engines/checkpoint.py   the resumable checkpoint (shared with the demo model's trainer)

The presets live in engines/types.py (REGISTER_PRESETS, FAMILY_LR); what was tried and measured to choose them, and
the other choices here, is in docs/registration.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from engines.checkpoint import Checkpoint
from engines.faults import fault_point
from engines.images import prepare_photos
from engines.register.bank import (
    TEMPLATES_PATH,
    TRAIN_PROMPT,
    TokenizedBank,
    class_mask,
    class_token_ids,
    load_sentence_templates,
    sentence_bank,
    split_bank,
    tokenize_bank,
)
from engines.register.condition import SplicedCondition, encoder_output, unet_condition
from engines.register.trainer import train_subject
from engines.types import (
    FAMILY_LR,
    REGISTER_PRESETS,
    InputError,
    ProgressCallback,
    RegisterPreset,
    RegisterRequest,
    SubjectInfo,
)

PRESETS = REGISTER_PRESETS  # the same dict object: engines/types.py keeps the one table the UI and CLI read too

__all__ = [
    "PRESETS",
    "TEMPLATES_PATH",
    "TRAIN_PROMPT",
    "RegisterPreset",
    "SplicedCondition",
    "TokenizedBank",
    "class_mask",
    "class_token_ids",
    "encoder_output",
    "load_sentence_templates",
    "register_subject",
    "resolve_preset",
    "sentence_bank",
    "split_bank",
    "tokenize_bank",
    "unet_condition",
]


def resolve_preset(name: str, overrides: dict[str, Any] | None = None, family: str = "") -> RegisterPreset:
    """A preset for a model family, with the caller's overrides (an overridden lr is taken as it is)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    base = PRESETS[name]
    if base.steps == 0:  # instant: nothing is trained, so there is nothing to override
        return base
    preset = replace(base, **{"lr": FAMILY_LR.get(family, base.lr), **(overrides or {})})
    if preset.steps < 1 or preset.batch < 1 or preset.reg_batch < 1 or preset.lr <= 0 or preset.reg_weight < 0:
        raise InputError("registration settings: steps, batch and reg_batch must be ≥ 1, lr > 0, λ ≥ 0")
    return preset


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _request_key(bundle, request: RegisterRequest, preset: RegisterPreset) -> str:
    """What a checkpoint must match to be resumed: the same photos (by content), settings, model and optimizer."""
    payload = {
        "request": {**asdict(request), "photos": [_file_digest(p) for p in request.photos]},
        "preset": asdict(preset),
        "fingerprint": bundle.fingerprint,
        "family": bundle.family,
        # optimizer state is not portable between AdamW8bit (CUDA + bitsandbytes) and torch AdamW
        "device": bundle.device.type,
        "bnb": importlib.util.find_spec("bitsandbytes") is not None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def register_subject(
    bundle,
    request: RegisterRequest,
    library,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    segmenter=None,
) -> SubjectInfo:
    """Train Δ for one subject and add it to `library`; nothing is written to the library unless it succeeds.

    A cancelled run raises Cancelled after saving a checkpoint under library/.work/<name>/; calling again with the
    same request (same photos, preset, seed and model) resumes from it. The checkpoint is deleted on success.
    """
    preset = resolve_preset(request.preset, overrides, bundle.family)
    if not overwrite:
        library.check_free(request.name)
    prepared = prepare_photos(request.photos, bundle.native_size, segmenter)  # validates every photo first
    if preset.steps == 0:
        return _add_instant(bundle, request, prepared, library, overwrite)
    checkpoint = Checkpoint(library.work_dir(request.name), _request_key(bundle, request, preset))
    fault_point("register.start")
    trained = train_subject(bundle, request, preset, prepared, checkpoint, on_progress, cancel)
    fault_point("register.trained")  # before the library write
    info = SubjectInfo(
        name=request.name,
        class_word=request.class_word.strip(),
        family=bundle.family,
        fingerprint=bundle.fingerprint,
        created=datetime.now(timezone.utc).isoformat(),
        steps=preset.steps,
        loss_curve=trained.curve,
    )
    result = library.add(
        info,
        trained.deltas,
        [p.photo for p in prepared],
        [p.mask for p in prepared],
        overwrite=overwrite,
        stats=trained.stats,
    )
    fault_point("register.added")  # the subject is in, its checkpoint not cleared yet
    library.clear_work(request.name)
    return result


def _add_instant(bundle, request: RegisterRequest, prepared, library, overwrite: bool) -> SubjectInfo:
    """An instant subject: its cropped photos and foreground masks, no residual. It works with any model."""
    info = SubjectInfo(name=request.name, class_word=request.class_word.strip(), family=bundle.family,
                       fingerprint="", created=datetime.now(timezone.utc).isoformat(), steps=0)  # fmt: skip
    photos, masks = [p.photo for p in prepared], [p.mask for p in prepared]
    stats = {"preset": request.preset, "photos": len(prepared)}
    return library.add(info, None, photos, masks, overwrite=overwrite, stats=stats)
