"""Subject registration: Cones 2 residual token embeddings (papers/cones2.txt §3.2, Eq. 2–5).

A copy of the text encoder(s) E^custom is fine-tuned on the subject's photos with

    L = L_sub + λ·L_reg                                                    (Eq. 4)
    L_sub = E_{x,ε,t} w·‖ε_θ(x_t, c, t) − target‖²                                   (Eq. 2; target ε or v)
    c = E("a photo of {class}") with its class-word rows taken from E^custom("a photo of {class}")
    L_reg = E_{c∈C_class} mean_{p∈c, p≠class} ‖E^custom(c)_p − E(c)_p‖²            (Eq. 3)

and the subject is stored as Δ = mean_{c∈C_class} (E^custom(c)_class − E(c)_class)        (Eq. 5)
one (n_class_tokens, width) float32 tensor per text encoder; generation adds it at the class-word tokens (Eq. 6).
c is the condition that Eq. 6 builds at generation, so the photos can only be learned where Δ keeps them
(SplicedCondition says why Eq. 2 read literally loses the subject).

"Output of the encoder" is exactly what the diffusers pipeline feeds the UNet: `last_hidden_state` (after the final
layer norm) for SD 1.5 / 2.x / demo, and `hidden_states[-2]` (penultimate layer, no final norm) of both encoders for
SDXL, concatenated along the feature axis (encoder 1 first). Unlike the public Cones 2 code (which pins only the BOS
and EOS outputs of the single instance prompt, notes §1.2), L_reg here runs over a bank of ≥1,000 template
sentences with the class word and pins every other position, padding included (the UNet attends to all 77).

Speed: the photos' latent distributions (and their mirror images) are encoded once up front; the frozen encoder's
targets for the L_reg pool and its class-token outputs for Δ are computed once up front from the untouched copy, so
no second encoder is kept; the UNet is frozen (eval, requires_grad False) but gradients flow through it; on CUDA,
autocast (bf16, else fp16 with a GradScaler) with fp32 master weights and bitsandbytes AdamW8bit when importable.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import random
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from engines.images import prepare_photos
from engines.types import Cancelled, InputError, ProgressCallback, RegisterRequest, StepProgress, SubjectInfo

TEMPLATES_PATH = Path(__file__).resolve().parent.parent / "presets" / "sentence_templates.json"
TRAIN_PROMPT = "a photo of {cls}"  # the paper's D_s caption: the bare class word, no rare identifier (notes §1.2)
HELDOUT_EVERY = 10  # every 10th bank sentence never enters L_reg: it measures preservation on unseen sentences
HELDOUT_EVAL = 100  # held-out sentences on which preservation is measured after training
BACKGROUND_WEIGHT = 0.1  # loss weight outside the foreground mask (0 would ignore the background completely)


@dataclass(frozen=True)
class RegisterPreset:
    steps: int
    lr: float
    reg_weight: float  # λ of Eq. 4
    batch: int  # photos (latents) per step for L_sub
    reg_batch: int  # bank sentences per step for L_reg
    reg_pool: int  # bank sentences whose frozen outputs are precomputed for L_reg
    delta_sentences: int  # bank sentences averaged in Eq. 5
    checkpoint_every: int  # steps between resumable checkpoints (0: only when cancelled). A checkpoint holds the
    # fp32 encoder(s) and AdamW moments: ~1.5 GB for SD 1.5, ~10 GB for SDXL, so it is written sparingly
    gradient_checkpointing: bool = False
    warmup: float = 0.1  # fraction of the steps over which the lr ramps up linearly (Adam's first steps are
    # sign-like, a full lr there moves every weight at once)
    why: str = ""


# Cones 2 trains the whole encoder 4,000 steps at lr 5e-6, batch 1 (~25 min on an A100, notes §1.2). The text
# encoder only has to move the class token's output, and L_reg (over a sentence bank, unlike the public code) keeps
# the rest in place, so a somewhat larger learning rate with a batch of photos should reach a usable Δ in a few
# hundred steps. These numbers are NOT yet validated on real SD weights (only on tiny/random models): measure with
# scripts/bench_register.py and the demo world's identity metric before trusting them.
# λ = 1 on a per-element MSE: both terms are per-element mean squares, and L_sub sits around 0.1–0.2, so λ = 1 makes
# a drift of ~0.3 per element at a non-class token cost as much as the whole denoising loss.
PRESETS: dict[str, RegisterPreset] = {
    "quick": RegisterPreset(
        steps=120, lr=3e-5, reg_weight=1.0, batch=2, reg_batch=4, reg_pool=128, delta_sentences=256,
        checkpoint_every=0,
        why="a first look in seconds: few steps at a high lr; Δ from 256 sentences (its mean is already stable)"),
    "standard": RegisterPreset(
        steps=300, lr=1.5e-5, reg_weight=1.0, batch=4, reg_batch=8, reg_pool=256, delta_sentences=1000,
        checkpoint_every=150,
        why="the default: 300 steps × 4 photos = 1,200 photo-steps at 3× the paper's lr (its 4,000 × 1 steps of "
            "batch 1 are mostly gradient noise); Δ over the paper's 1,000 sentences; aims at well under a minute"),
    "thorough": RegisterPreset(
        steps=800, lr=8e-6, reg_weight=1.0, batch=4, reg_batch=16, reg_pool=512, delta_sentences=1000,
        checkpoint_every=200, gradient_checkpointing=True,
        why="closer to the paper's recipe (lower lr, more steps, a larger L_reg batch) for hard subjects; "
            "gradient checkpointing keeps SDXL within 24 GB"),
}

# The demo model's text encoder (3 layers, 128 wide) and its small UNet need a much larger step than SD's for Δ to
# carry a subject, and one step size serves every preset there: at the SD presets' lower rates for standard and
# thorough, the preservation term wins and L_sub hardly moves (0.042 → 0.040 on the striped ball). Subject bench
# (engines/bench_subjects.py, 2 subjects × 12 compositions), identity: quick 0% at 3e-5, 46% at 1.5e-4, 62% at 3e-4,
# 62% at 6e-4; standard 42% at 1.5e-4, 50% at 3e-4; thorough 29% at 8e-5, 50% at 3e-4.
FAMILY_LR = {"demo": 3e-4}


# ---------------------------------------------------------------------------------------------- sentence bank
_SLOT = re.compile(r"\{(\w+)\}")
_TEMPLATE_KEYS = {"format_version", "about", "frames", "scene", "style", "style_adj", "attribute", "relation", "other"}


def load_sentence_templates(path: Path = TEMPLATES_PATH) -> dict[str, Any]:
    """Read and validate presets/sentence_templates.json (unknown keys, bad slots → InputError)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"sentence templates {Path(path).name}: {error}") from error
    if not isinstance(data, dict) or set(data) != _TEMPLATE_KEYS:
        keys = set(data) if isinstance(data, dict) else set()
        raise InputError(f"sentence templates: keys must be {sorted(_TEMPLATE_KEYS)} "
                         f"(unknown: {sorted(keys - _TEMPLATE_KEYS)}, missing: {sorted(_TEMPLATE_KEYS - keys)})")
    if data["format_version"] != 1:
        raise InputError("sentence templates: format_version must be 1")
    slots = _TEMPLATE_KEYS - {"format_version", "about", "frames"}
    for key in slots | {"frames"}:
        values = data[key]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise InputError(f"sentence templates: '{key}' must be a non-empty list of non-empty strings")
        if key != "frames" and any("{" in v or "}" in v for v in values):
            raise InputError(f"sentence templates: '{key}' values cannot contain braces")
    for frame in data["frames"]:
        used = _SLOT.findall(frame)
        if used.count("cls") != 1:
            raise InputError(f"sentence template {frame!r} must contain {{cls}} exactly once")
        unknown = set(used) - slots - {"cls", "a"}
        if unknown:
            raise InputError(f"sentence template {frame!r} uses unknown slots {sorted(unknown)}")
    return data


def sentence_bank(class_word: str, n: int = 1000, templates: dict[str, Any] | None = None) -> list[str]:
    """n distinct sentences containing `class_word` once, deterministic for a class word (no network)."""
    cls = " ".join(class_word.split())
    if not cls or "{" in cls or "}" in cls:
        raise InputError(f"class word {class_word!r} is not usable")
    data = templates or load_sentence_templates()
    words = set(cls.lower().split())
    pools = {key: [v for v in data[key] if not (words & set(v.lower().split()))] or data[key]
             for key in _TEMPLATE_KEYS - {"format_version", "about", "frames"}}
    rng = random.Random(f"troupe-bank:{cls.lower()}")
    frames = list(data["frames"])
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        frame = frames[attempts % len(frames)]
        attempts += 1

        def fill(match: re.Match) -> str:
            slot = match.group(1)
            return cls if slot == "cls" else "\x00" if slot == "a" else rng.choice(pools[slot])

        text = _SLOT.sub(fill, frame)
        text = re.sub("\x00 (\\S)", lambda m: ("an " if m.group(1).lower() in "aeiou" else "a ") + m.group(1), text)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise InputError(f"the sentence templates give only {len(out)} distinct sentences (need {n})")
    return out


def split_bank(sentences: list[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(training, held-out): every `every`-th sentence is held out of L_reg."""
    return ([s for i, s in enumerate(sentences) if i % every != every - 1],
            [s for i, s in enumerate(sentences) if i % every == every - 1])


# ---------------------------------------------------------------------------------------------- encoders
def encoder_output(encoder: torch.nn.Module, ids: torch.Tensor, xl: bool,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly what the pipeline feeds the UNet from one encoder: (B, 77, width)."""
    mask = attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    if xl:
        return encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]  # penultimate, no norm
    return encoder(ids, attention_mask=mask)[0]  # last_hidden_state, after the final layer norm


def unet_condition(encoders: list[torch.nn.Module], ids: list[torch.Tensor], xl: bool) -> torch.Tensor:
    """(B, 77, Σ widths): the encoders' outputs concatenated along features (encoder 1 first), as in SDXL."""
    return torch.cat([encoder_output(e, i, xl) for e, i in zip(encoders, ids)], dim=-1)


@dataclass
class TokenizedBank:
    sentences: list[str]
    ids: list[torch.Tensor]  # per tokenizer (N, L) int64
    class_pos: list[torch.Tensor]  # per tokenizer (N,) start of the class tokens


def class_token_ids(tokenizer, class_word: str) -> list[int]:
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if not ids:
        raise InputError(f"the class word {class_word!r} has no tokens")
    return list(ids)


def tokenize_bank(tokenizers: list, sentences: list[str], class_word: str) -> TokenizedBank:
    """Tokenize like the pipeline (pad to model_max_length) and find the class tokens; drop sentences that lose them."""
    all_ids, all_pos = [], []
    keep = np.ones(len(sentences), bool)
    for tokenizer in tokenizers:
        cls = class_token_ids(tokenizer, class_word)
        ids = tokenizer(sentences, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # (N, L)
        windows = ids.unfold(1, len(cls), 1)  # (N, L − n + 1, n)
        hits = (windows == torch.tensor(cls)).all(-1)  # (N, L − n + 1)
        found = hits.any(1)
        pos = hits.float().argmax(1)  # first occurrence
        keep &= found.numpy()
        all_ids.append(ids)
        all_pos.append(pos)
    index = torch.from_numpy(np.nonzero(keep)[0])
    if len(index) == 0:
        raise InputError(f"the class word {class_word!r} does not fit in the text encoder's window")
    return TokenizedBank([sentences[i] for i in index.tolist()], [x[index] for x in all_ids],
                         [p[index] for p in all_pos])


def class_mask(pos: torch.Tensor, n_class: int, length: int) -> torch.Tensor:
    """(N, L) bool, True at the class-token positions."""
    arange = torch.arange(length)[None]  # (1, L)
    return (arange >= pos[:, None]) & (arange < pos[:, None] + n_class)


# ---------------------------------------------------------------------------------------------- registration
def _autocast_dtype(device: torch.device, unet_dtype: torch.dtype) -> torch.dtype | None:
    """CUDA: autocast in the UNet's half dtype (no fp16/bf16 mixing); an fp32 UNet gets bf16 where supported."""
    if device.type != "cuda":
        return None
    if unet_dtype in (torch.float16, torch.bfloat16):
        return unet_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay 0: decay pulls weights toward zero, not toward the frozen encoder, so it only adds drift.
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        except ImportError:
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _request_key(bundle, request: RegisterRequest, preset: RegisterPreset) -> str:
    payload = {"request": {**asdict(request), "photos": [_file_digest(p) for p in request.photos]},
               "preset": asdict(preset), "fingerprint": bundle.fingerprint, "family": bundle.family,
               # optimizer state is not portable between AdamW8bit (CUDA + bitsandbytes) and torch AdamW
               "device": bundle.device.type, "bnb": importlib.util.find_spec("bitsandbytes") is not None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def resolve_preset(name: str, overrides: dict[str, Any] | None = None, family: str = "") -> RegisterPreset:
    """A preset for a model family, with the caller's overrides (an overridden lr is taken as it is)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    base = PRESETS[name]
    preset = replace(base, **{"lr": FAMILY_LR.get(family, base.lr), **(overrides or {})})
    if preset.steps < 1 or preset.batch < 1 or preset.reg_batch < 1 or preset.lr <= 0 or preset.reg_weight < 0:
        raise InputError("registration settings: steps, batch and reg_batch must be ≥ 1, lr > 0, λ ≥ 0")
    return preset


class _Checkpoint:
    """state.safetensors (encoder weights, optimizer tensors, RNG) + state.json (step, curve, optimizer scalars)."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def save(self, step: int, encoders, optimizer, generator, scaler, curve: list[float], elapsed: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tensors: dict[str, torch.Tensor] = {}
        for i, encoder in enumerate(encoders):
            for name, value in encoder.state_dict().items():
                tensors[f"enc{i}.{name}"] = value.detach().cpu().contiguous()
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, entries in state["state"].items():
            for k, v in entries.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        tensors["rng"] = generator.get_state().cpu()
        meta = {"key": self.key, "token": token, "step": step, "curve": curve, "elapsed": elapsed,
                "param_groups": state["param_groups"], "opt_scalars": scalars,
                "scaler": scaler.state_dict() if scaler is not None else None}
        part = self.folder / "state.safetensors.part"
        save_file(tensors, str(part), metadata={"token": token})
        os.replace(part, self.folder / "state.safetensors")
        part_json = self.folder / "state.json.part"
        part_json.write_text(json.dumps(meta, default=float))
        os.replace(part_json, self.folder / "state.json")

    def load(self, encoders, optimizer, generator, scaler) -> tuple[int, list[float], float] | None:
        try:
            meta = json.loads((self.folder / "state.json").read_text())
            with safe_open(str(self.folder / "state.safetensors"), framework="pt") as file:
                if meta.get("key") != self.key or (file.metadata() or {}).get("token") != meta.get("token"):
                    return None  # another request's (or a half-written) checkpoint
                tensors = {k: file.get_tensor(k) for k in file.keys()}
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        except Exception:  # a damaged safetensors file: start over
            return None
        for i, encoder in enumerate(encoders):
            prefix = f"enc{i}."
            encoder.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value
        for pid, entries in meta["opt_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        generator.set_state(tensors["rng"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        return int(meta["step"]), [float(v) for v in meta["curve"]], float(meta["elapsed"])


def register_subject(bundle, request: RegisterRequest, library, on_progress: ProgressCallback | None = None,
                     cancel: threading.Event | None = None, *, overrides: dict[str, Any] | None = None,
                     overwrite: bool = False, segmenter=None) -> SubjectInfo:
    """Train Δ for one subject and add it to `library`; nothing is written to the library unless it succeeds.

    A cancelled run raises Cancelled after saving a checkpoint under library/.work/<name>/; calling again with the
    same request (same photos, preset, seed and model) resumes from it. The checkpoint is deleted on success.
    """
    preset = resolve_preset(request.preset, overrides, bundle.family)
    if not overwrite and library.folder(request.name).exists():
        raise InputError(f"a subject named '{request.name}' already exists (delete or rename it first)")
    prepared = prepare_photos(request.photos, bundle.native_size, segmenter)  # validates every photo first
    trainer = _Trainer(bundle, request, preset, prepared)
    checkpoint = _Checkpoint(library.work_dir(request.name), _request_key(bundle, request, preset))
    deltas, curve, stats = trainer.run(checkpoint, on_progress, cancel)
    info = SubjectInfo(name=request.name, class_word=request.class_word.strip(), family=bundle.family,
                       fingerprint=bundle.fingerprint, created=datetime.now(timezone.utc).isoformat(),
                       steps=preset.steps, loss_curve=tuple(curve))
    result = library.add(info, deltas, [p.photo for p in prepared], [p.mask for p in prepared], overwrite=overwrite,
                         stats=stats)
    library.clear_work(request.name)
    return result


def _trainable_copy(encoder: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An fp32 copy of a text encoder, detached from any offload hooks of the pipeline."""
    if any(not p.is_floating_point() for p in encoder.parameters()):
        raise InputError("registering a subject trains a copy of the text encoder, which cannot be quantized: load "
                         "the model with quantization none for registration (the UNet may stay quantized)")
    tuned = copy.deepcopy(encoder)
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(tuned, recurse=True)
    except ImportError:
        pass
    return tuned.to(device, torch.float32).eval().requires_grad_(False)


@dataclass(frozen=True)
class SplicedCondition:
    """The UNet condition for L_sub, built the way generation builds it (Eq. 6): the frozen encoder's outputs of the
    training prompt, with only the class-word positions taken from the encoder being tuned.

    Eq. 2 read literally feeds the tuned encoder's whole output, which lets the photos' look settle in the BOS, EOS
    and padding outputs of "a photo of {class}". Δ (Eq. 5) keeps only the class-word shift, so that part of the
    subject is lost at generation: on the demo world the registered subject kept its pattern in 0–4% of
    compositions that way. Splicing is the public code's pinning of the instance prompt's BOS/EOS outputs taken
    to its limit: the denoising loss can only be lowered where Δ will carry the subject."""

    frozen: torch.Tensor  # (1, L, D) fp32
    is_class: torch.Tensor  # (1, L) bool

    def __call__(self, tuned: torch.Tensor) -> torch.Tensor:
        """(1, L, D) tuned outputs of the training prompt → (1, L, D), in the tuned outputs' dtype."""
        return torch.where(self.is_class[..., None], tuned, self.frozen.to(tuned.dtype))


class _Trainer:
    def __init__(self, bundle, request: RegisterRequest, preset: RegisterPreset, prepared):
        self.bundle, self.request, self.preset, self.prepared = bundle, request, preset, prepared
        self.pipe = bundle.pipe
        self.device = bundle.device
        self.xl = bundle.is_xl
        self.class_word = " ".join(request.class_word.split())
        self.amp = _autocast_dtype(self.device, self.pipe.unet.dtype)

    def autocast(self):
        if self.amp is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    # -- data encoded once
    @torch.no_grad()
    def encode_photos(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        pixels = torch.stack([torch.from_numpy(np.asarray(p.photo, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                              for p in self.prepared])  # (n, 3, H, W) in [-1, 1]
        masks = torch.stack([torch.from_numpy(np.asarray(p.mask, np.float32) / 255.0)[None]
                             for p in self.prepared])  # (n, 1, H, W)
        pixels = torch.cat([pixels, pixels.flip(-1)])  # (2n, 3, H, W): mirror images double the data for free
        masks = torch.cat([masks, masks.flip(-1)])  # (2n, 1, H, W)
        original = vae.dtype
        upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            means, stds = [], []
            for i in range(0, pixels.shape[0], 4):  # chunks: 20 photos at 1024 px in fp32 would not fit at once
                dist = vae.encode(pixels[i:i + 4].to(self.device, vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
            mean, std = torch.cat(means), torch.cat(stds)  # (2n, 4, h, w)
        finally:
            if upcast:
                vae.to(original)
        weights = F.interpolate(masks.to(self.device), size=mean.shape[-2:], mode="area")  # (2n, 1, h, w)
        if not self.request.use_masks:
            weights = torch.ones_like(weights)
        else:
            weights = BACKGROUND_WEIGHT + (1 - BACKGROUND_WEIGHT) * weights
        return mean, std, weights

    def run(self, checkpoint: _Checkpoint, on_progress, cancel) -> tuple[dict[str, torch.Tensor], list[float], dict]:
        preset, device, xl = self.preset, self.device, self.xl
        tokenizers = self.bundle.tokenizers
        frozen_encoders = self.bundle.text_encoders
        # E^custom: fp32 master copies; the bundle's encoders are never touched
        tuned = [_trainable_copy(e, device) for e in frozen_encoders]
        n_class = [len(class_token_ids(t, self.class_word)) for t in tokenizers]

        bank = sentence_bank(self.class_word, max(preset.delta_sentences, preset.reg_pool * 10 // 9 + 10))
        train_sentences, heldout_sentences = split_bank(bank)
        heldout = tokenize_bank(tokenizers, heldout_sentences[:HELDOUT_EVAL], self.class_word)
        heldout_keep = ~class_mask(heldout.class_pos[0], n_class[0], heldout.ids[0].shape[1]).to(device)  # (H, L)
        reg = tokenize_bank(tokenizers, train_sentences[:preset.reg_pool], self.class_word)
        delta_bank = tokenize_bank(tokenizers, bank[:preset.delta_sentences], self.class_word)
        prompt = tokenize_bank(tokenizers, [TRAIN_PROMPT.format(cls=self.class_word)], self.class_word)
        prompt_ids = [x.to(device) for x in prompt.ids]  # per tokenizer (1, L)
        length = reg.ids[0].shape[1]
        keep = ~class_mask(reg.class_pos[0], n_class[0], length)  # (P, L) positions pinned by L_reg (Eq. 3)
        for pos, n in zip(reg.class_pos[1:], n_class[1:]):
            keep &= ~class_mask(pos, n, length)
        keep = keep.to(device)

        noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prediction = noise_scheduler.config.prediction_type
        # frozen targets, computed once from the untouched copy (identical to E under the same autocast)
        with torch.no_grad():
            with self.autocast():
                reg_targets = torch.cat([unet_condition(tuned, [x[i:i + 64].to(device) for x in reg.ids], xl).float()
                                         for i in range(0, len(reg.sentences), 64)])  # (P, L, D)
                prompt_frozen = unet_condition(tuned, prompt_ids, xl).float()  # (1, L, D)
            frozen_rows = self._class_rows(tuned, delta_bank, n_class)  # per encoder (N, n_cls, width)
            added = self._added_cond(tuned, prompt_ids)
            heldout_ids = [x.to(device) for x in heldout.ids]
            heldout_ref = unet_condition(tuned, heldout_ids, xl).float()  # (H, L, D) frozen, fp32
        prompt_class = torch.zeros_like(keep[:1])  # (1, L)
        for pos, n in zip(prompt.class_pos, n_class):
            prompt_class |= class_mask(pos, n, length).to(device)
        condition = SplicedCondition(prompt_frozen, prompt_class)
        mean, std, weights = self.encode_photos()
        eval_before = self._eval_sub(tuned, noise_scheduler, mean, weights, prompt_ids, condition, added)

        checkpointing = preset.gradient_checkpointing or self._needs_checkpointing()
        params = [p for e in tuned for p in e.parameters()]
        for e in tuned:
            e.train().requires_grad_(True)
            if checkpointing:
                enable = getattr(e, "activation_checkpointing_enable", None) or e.gradient_checkpointing_enable
                enable()
        optimizer = _make_optimizer(params, preset.lr, device)
        scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        generator = torch.Generator(device).manual_seed(self.request.seed)
        resumed = checkpoint.load(tuned, optimizer, generator, scaler)
        start, curve, prior = resumed if resumed else (0, [], 0.0)

        unet = self.pipe.unet
        grad_flags = [p.requires_grad for p in unet.parameters()]
        was_training = unet.training
        was_checkpointing = getattr(unet, "is_gradient_checkpointing", False)
        unet.eval().requires_grad_(False)
        if checkpointing and not was_checkpointing:
            unet.enable_gradient_checkpointing()
        sub_curve, reg_curve = [], []
        began = time.perf_counter()
        warmup_steps = max(1, round(preset.warmup * preset.steps))
        try:
            for step in range(start, preset.steps):
                for group in optimizer.param_groups:  # a function of the step alone: resumes exactly
                    group["lr"] = preset.lr * min(1.0, (step + 1) / warmup_steps)
                if cancel is not None and cancel.is_set():
                    checkpoint.save(step, tuned, optimizer, generator, scaler, curve, prior + time.perf_counter() - began)
                    raise Cancelled(f"registration of '{self.request.name}' cancelled at step {step}/{preset.steps}")
                l_sub, l_reg = self._step(tuned, optimizer, scaler, generator, noise_scheduler, prediction,
                                          mean, std, weights, prompt_ids, condition, added, reg, reg_targets, keep)
                loss = l_sub + preset.reg_weight * l_reg
                curve.append(loss)
                sub_curve.append(l_sub)
                reg_curve.append(l_reg)
                elapsed = prior + time.perf_counter() - began
                if on_progress is not None:
                    on_progress(StepProgress(step=step + 1, total=preset.steps, elapsed=elapsed, loss=loss))
                done = step + 1
                if preset.checkpoint_every and done % preset.checkpoint_every == 0 and done < preset.steps:
                    checkpoint.save(done, tuned, optimizer, generator, scaler, curve, elapsed)
        finally:
            for p, flag in zip(unet.parameters(), grad_flags):
                p.requires_grad_(flag)
            unet.train(was_training)
            if checkpointing and not was_checkpointing:
                unet.disable_gradient_checkpointing()

        for e in tuned:
            e.eval().requires_grad_(False)
        with torch.no_grad():  # Eq. 5: Δ = mean over the bank of (E^custom − E) at the class tokens
            tuned_rows = self._class_rows(tuned, delta_bank, n_class)
            heldout_out = unet_condition(tuned, heldout_ids, xl).float()  # (H, L, D)
            drift = (heldout_out - heldout_ref).norm(dim=-1)[heldout_keep]  # (K,) non-class tokens only
            preservation = float(drift.mean() / heldout_ref.norm(dim=-1)[heldout_keep].mean())
        eval_after = self._eval_sub(tuned, noise_scheduler, mean, weights, prompt_ids, condition, added)
        keys = ["text_encoder", "text_encoder_2"]
        deltas = {keys[i]: (t - f).mean(0).float().cpu() for i, (t, f) in enumerate(zip(tuned_rows, frozen_rows))}
        stats = {"preset": self.request.preset, "lr": preset.lr, "reg_weight": preset.reg_weight,
                 "batch": preset.batch, "seconds": round(prior + time.perf_counter() - began, 3),
                 "delta_sentences": len(delta_bank.sentences), "photos": len(self.prepared),
                 "use_masks": self.request.use_masks, "gradient_checkpointing": checkpointing,
                 "prediction_type": prediction, "seed": self.request.seed,
                 "final_l_sub": float(np.mean(sub_curve[-10:])) if sub_curve else None,
                 "final_l_reg": float(np.mean(reg_curve[-10:])) if reg_curve else None,
                 "l_sub_eval_before": eval_before, "l_sub_eval_after": eval_after,
                 "heldout_preservation_error": preservation, "heldout_sentences": len(heldout.sentences),
                 "delta_norms": [round(float(d.norm()), 6) for d in deltas.values()]}
        return deltas, curve, stats

    def _needs_checkpointing(self) -> bool:
        """SDXL backprop through the UNet at 1024 px with a batch of 4 does not fit under ~40 GB without it."""
        if not self.xl or self.device.type != "cuda":
            return False
        return torch.cuda.get_device_properties(self.device).total_memory < 40 * 2**30

    @torch.no_grad()
    def _eval_sub(self, tuned, noise_scheduler, mean, weights, prompt_ids, condition, added) -> float:
        """L_sub on a fixed set (≤ 4 latent means × 4 timesteps, fixed noise): comparable before and after, and
        cheap (two UNet batches of 8) so that it can run on every registration."""
        unet, device = self.pipe.unet, self.device
        generator = torch.Generator(device).manual_seed(12345)
        total_t = noise_scheduler.config.num_train_timesteps
        k = min(mean.shape[0], 4)
        latents = (mean[:k] * self.pipe.vae.config.scaling_factor).repeat(4, 1, 1, 1)  # (4k, 4, h, w)
        w_all = weights[:k].repeat(4, 1, 1, 1)  # (4k, 1, h, w)
        t_all = torch.tensor([int(total_t * f) for f in (0.2, 0.4, 0.6, 0.8)], device=device)
        t_all = t_all.repeat_interleave(k)  # (4k,)
        noise_all = torch.randn(latents.shape, generator=generator, device=device)
        prediction = noise_scheduler.config.prediction_type
        losses = []
        with self.autocast():
            cond1 = condition(unet_condition(tuned, prompt_ids, self.xl)).to(unet.dtype)  # (1, L, D)
            for i in range(0, latents.shape[0], 8):
                lat, noise, t = latents[i:i + 8], noise_all[i:i + 8], t_all[i:i + 8]
                b = lat.shape[0]
                noisy = noise_scheduler.add_noise(lat, noise, t)
                target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(lat, noise, t)
                kwargs = {}
                if added is not None:
                    kwargs["added_cond_kwargs"] = {k: v.expand(b, -1).to(unet.dtype) for k, v in added.items()}
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond1.expand(b, -1, -1), **kwargs).sample
                w = w_all[i:i + 8]
                losses.append(float(((pred.float() - target.float()) ** 2 * w).sum() / (w.sum() * pred.shape[1])) * b)
        return sum(losses) / latents.shape[0]

    def _class_rows(self, encoders, bank: TokenizedBank, n_class: list[int]) -> list[torch.Tensor]:
        """Per encoder (N, n_cls, width): fp32 outputs at the class tokens (no autocast: Δ is stored in fp32)."""
        rows: list[list[torch.Tensor]] = [[] for _ in encoders]
        for i in range(0, len(bank.sentences), 64):
            for k, encoder in enumerate(encoders):
                out = encoder_output(encoder, bank.ids[k][i:i + 64].to(self.device), self.xl).float()  # (b, L, W)
                pos = bank.class_pos[k][i:i + 64].to(self.device)
                index = pos[:, None] + torch.arange(n_class[k], device=self.device)[None]  # (b, n_cls)
                rows[k].append(torch.gather(out, 1, index[..., None].expand(-1, -1, out.shape[-1])))
        return [torch.cat(r) for r in rows]

    def _added_cond(self, encoders, prompt_ids) -> dict[str, torch.Tensor] | None:
        """SDXL's pooled text embedding (from the frozen encoder 2: Δ never touches it) and size time ids."""
        if not self.xl:
            return None
        pooled = encoders[1](prompt_ids[1], output_hidden_states=True)[0].float()  # (1, proj)
        size = self.bundle.native_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def _step(self, tuned, optimizer, scaler, generator, noise_scheduler, prediction, mean, std, weights,
              prompt_ids, condition, added, reg: TokenizedBank, reg_targets, keep) -> tuple[float, float]:
        preset, device, unet = self.preset, self.device, self.pipe.unet
        scaling = self.pipe.vae.config.scaling_factor
        pick = torch.randint(0, mean.shape[0], (preset.batch,), generator=generator, device=device)  # (b,)
        latents = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator, device=device))
        latents = latents * scaling  # (b, 4, h, w)
        noise = torch.randn(latents.shape, generator=generator, device=device)  # (b, 4, h, w)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (preset.batch,), generator=generator,
                          device=device)  # (b,)
        noisy = noise_scheduler.add_noise(latents, noise, t)  # (b, 4, h, w)
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        rows = torch.randint(0, len(reg.sentences), (preset.reg_batch,), generator=generator, device=device)  # (R,)
        with self.autocast():
            # one encoder pass for the training prompt and the L_reg sentences together
            ids = [torch.cat([p, x[rows.cpu()].to(device)]) for p, x in zip(prompt_ids, reg.ids)]  # (1 + R, L)
            encoded = unet_condition(tuned, ids, self.xl)  # (1 + R, L, D)
            cond = condition(encoded[:1]).expand(preset.batch, -1, -1).to(unet.dtype)  # (b, L, D)
            kwargs = {}
            if added is not None:
                kwargs["added_cond_kwargs"] = {k: v.expand(preset.batch, -1).to(unet.dtype) for k, v in added.items()}
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond, **kwargs).sample  # (b, 4, h, w)
            w = weights[pick]  # (b, 1, h, w)
            l_sub = ((pred.float() - target.float()) ** 2 * w).sum() / (w.sum() * pred.shape[1])  # Eq. 2
            out = encoded[1:].float()  # (R, L, D)
            per_token = ((out - reg_targets[rows]) ** 2).mean(-1)  # (R, L)
            m = keep[rows].float()  # (R, L): every position but the class word (Eq. 3)
            l_reg = (per_token * m).sum() / m.sum()
            loss = l_sub + preset.reg_weight * l_reg  # Eq. 4
        optimizer.zero_grad(set_to_none=True)
        params = [p for e in tuned for p in e.parameters()]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return float(l_sub.detach()), float(l_reg.detach())


