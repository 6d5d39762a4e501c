"""A relation LoRA (DreamRelation §3.4): a low-rank update of the UNet's cross-attention projections
(attn2.to_q, to_k, to_v, to_out.0; rank 4 by default) learned from a relation's examples with

    L = ‖ε − ε_θ(x_t, t, c)‖²  +  λ_K·L_KML (t ≤ T/3)  +  λ_A·L_attn               (λ_K = 0.1, λ_A = 0.001)

(engines/relations/keypoint_loss.py for the two extra terms; v-prediction models regress v). The examples' latents,
the objects' own latents and the prompts' text conditioning are computed once; each step draws a batch of examples
and one timestep per example. The text encoder and every other weight stay frozen, so subjects' residuals and
reference identity keep working on top of it. On a GPU the UNet runs under autocast while the LoRA's weights stay
fp32. State is checkpointed (engines/checkpoint.py) every `SAVE_EVERY` steps and when cancelled, and a run with the
same examples, settings and model resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engines.checkpoint import Checkpoint, TrainingState
from engines.faults import fault_point
from engines.prompts import parse_prompt
from engines.reference_adapter import ADAPTER_NAME as REFERENCE_ADAPTER
from engines.reference_adapter import has_adapter
from engines.references import image_tensor
from engines.relations.examples import ExampleObject, RelationExample, RelationExamples
from engines.relations.keypoint_loss import ACTIVE_SHARE, attention_loss, keypoint_matching_loss, predicted_clean
from engines.subject_files import downsample_curve
from engines.types import (
    Cancelled,
    Layout,
    Region,
    RelationInfo,
    RelationTrainRequest,
    StepProgress,
    keypoint_weight,
)
from kernels.attention_record import AttentionRecord, RecordingAttnProcessor

TRAINING_ADAPTER = "relation-training"
TARGET_MODULES = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"  # DreamRelation: LoRA on the text cross-attention only
SAVE_EVERY = 50
GREY = 128  # what surrounds an object in its own image


@dataclass(frozen=True)
class EncodedExamples:
    latents: torch.Tensor  # (E, C, h, w) the examples, scaled VAE means
    own: torch.Tensor  # (E, 2, C, h, w) each object alone on grey
    points: torch.Tensor  # (E, 2, K, 2) keypoints (x, y) in [0, 1], the same in the example and the object's image
    valid: torch.Tensor  # (E, 2, K) bool
    masks: torch.Tensor  # (E, 2, h, w) the objects' masks at the latent's size
    positions: torch.Tensor  # (E, 2, W) token positions of each object's phrase, -1 padded
    condition: dict  # the UNet's text conditioning, one row per example


@dataclass(frozen=True)
class TrainedRelation:
    weights: dict[str, torch.Tensor]  # peft's keys ("…attn2.to_q.lora_A.weight"), fp32 on the CPU
    curve: tuple[float, ...]  # the loss of every step
    seconds: float


@torch.no_grad()
def encode_examples(bundle, examples: RelationExamples) -> EncodedExamples:
    side = bundle.native_size
    items = examples.examples + (tuple(mirrored(e) for e in examples.examples) if examples.mirror else ())
    pictures = [e.image.convert("RGB").resize((side, side), Image.LANCZOS) for e in items]
    masks = [[_resized_mask(o.mask, side) for o in e.objects] for e in items]  # (side, side) each
    alone = [[_alone(p, m) for m in pair] for p, pair in zip(pictures, masks)]
    encode = _encoder(bundle)
    latents = encode(pictures)  # (E, C, h, w)
    own = encode([image for pair in alone for image in pair]).unflatten(0, (len(items), 2))  # (E, 2, C, h, w)
    most = max(len(o.keypoints) for e in items for o in e.objects)
    points = torch.zeros(len(items), 2, most, 2)
    valid = torch.zeros(len(items), 2, most, dtype=torch.bool)
    for i, example in enumerate(items):
        for j, obj in enumerate(example.objects):
            points[i, j, : len(obj.keypoints)] = torch.tensor(obj.keypoints)
            valid[i, j, : len(obj.keypoints)] = True
    size = latents.shape[-2:]
    latent_masks = F.adaptive_avg_pool2d(torch.tensor(np.stack([np.stack(m) for m in masks])), size)  # (E, 2, h, w)
    prompts = [e.prompt for e in items]
    return EncodedExamples(latents, own, points, valid, latent_masks, _phrase_positions(bundle, items),
                           _text_condition(bundle, prompts))  # fmt: skip


def mirrored(example: RelationExample) -> RelationExample:
    """The example flipped left to right: image, masks, boxes and keypoints."""
    objects = tuple(ExampleObject(o.phrase, (1 - o.box[2], o.box[1], 1 - o.box[0], o.box[3]), o.mask[:, ::-1].copy(),
                                  tuple((1 - x, y) for x, y in o.keypoints)) for o in example.objects)  # fmt: skip
    return RelationExample(ImageOps.mirror(example.image), example.prompt, objects, example.source)


def _resized_mask(mask: np.ndarray, side: int) -> np.ndarray:
    image = Image.fromarray((mask * 255).clip(0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _alone(picture: Image.Image, mask: np.ndarray) -> Image.Image:
    """The object on grey: its own image, whose latent the keypoint loss compares against (Eq. 6)."""
    pixels = np.asarray(picture, np.float32)  # (S, S, 3)
    weight = mask[..., None]
    return Image.fromarray((pixels * weight + GREY * (1 - weight)).round().astype(np.uint8))


def _encoder(bundle) -> Callable[[list[Image.Image]], torch.Tensor]:
    vae = bundle.pipe.vae

    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([image_tensor(image) for image in images]) * 2 - 1  # (N, 3, S, S) in [-1, 1]
        mean = vae.encode(pixels.to(bundle.device, vae.dtype)).latent_dist.mean
        return (mean * vae.config.scaling_factor).float()

    return encode


def _phrase_positions(bundle, items) -> torch.Tensor:
    found = []
    for example in items:
        layout = Layout(tuple(Region(phrase=o.phrase, box=o.box) for o in example.objects))
        found.append(parse_prompt(example.prompt, layout, {}, bundle.tokenizers).region_positions)
    width = max(len(p) for pair in found for p in pair)
    positions = torch.full((len(items), 2, width), -1, dtype=torch.long)
    for i, pair in enumerate(found):
        for j, tokens in enumerate(pair):
            positions[i, j, : len(tokens)] = torch.tensor(tokens)
    return positions


def _text_condition(bundle, prompts: list[str]) -> dict:
    """The UNet's keyword arguments for these prompts without CFG (SDXL adds its pooled text and size ids)."""
    pipe, device = bundle.pipe, bundle.device
    if bundle.is_xl:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        side = bundle.native_size
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(prompts), device=device, dtype=pooled.dtype)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def _rows(condition: dict, index: torch.Tensor) -> dict:
    if isinstance(condition, dict):
        return {key: _rows(value, index) for key, value in condition.items()}
    return condition[index.to(condition.device)]


@contextmanager
def training_adapter(unet, rank: int):
    """A fresh LoRA on the cross-attention, the only trainable weights, removed afterwards; a reference adapter the
    UNet carries is left as it was (attached and switched off)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=True)
    unet.add_adapter(config, adapter_name=TRAINING_ADAPTER)  # makes it the active adapter
    unet.enable_adapters()
    unet.requires_grad_(False)
    trainable = [p for name, p in unet.named_parameters() if "lora_" in name and TRAINING_ADAPTER in name]
    for parameter in trainable:
        parameter.data = parameter.data.float()  # fp32 master weights under a half-precision UNet
        parameter.requires_grad_(True)
    try:
        yield trainable
    finally:
        unet.delete_adapters(TRAINING_ADAPTER)
        if has_adapter(unet):
            unet.set_adapter(REFERENCE_ADAPTER)
            unet.disable_adapters()


@contextmanager
def recording_cross_attention(unet, record: AttentionRecord, wanted: bool):
    if not wanted:
        yield
        return
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: RecordingAttnProcessor(record) if name.endswith("attn2.processor") else processor
                             for name, processor in previous.items()})  # fmt: skip
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def train_relation(bundle, request: RelationTrainRequest, examples: RelationExamples, checkpoint: Checkpoint,
                   on_progress: Callable[[StepProgress], None] | None = None, cancel=None) -> TrainedRelation:  # fmt: skip
    """Train the relation LoRA (or resume it from `checkpoint`); the UNet is unchanged afterwards. The request's
    keypoint weight must be a number (teach_relation resolves the family's)."""
    unet, scheduler = bundle.pipe.unet, bundle.pipe.scheduler
    data = encode_examples(bundle, examples)
    record = AttentionRecord()
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with training_adapter(unet, request.rank) as trainable, \
            recording_cross_attention(unet, record, request.attention_weight > 0):  # fmt: skip
        optimiser = torch.optim.AdamW(trainable, lr=request.learning_rate, weight_decay=0.0)
        state = TrainingState({"lora": torch.nn.ParameterList(trainable)}, optimiser, {"draws": generator})
        restored = checkpoint.load(state)
        step = restored.step if restored else 0
        curve = list(restored.extra.get("curve", [])) if restored else []
        seconds = float(restored.extra.get("seconds", 0.0)) if restored else 0.0
        started, first = time.perf_counter(), step
        try:
            while step < request.steps:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                curve.append(_step(bundle, scheduler, data, request, record, optimiser, trainable, generator))
                step += 1
                elapsed = time.perf_counter() - started
                if on_progress is not None:  # the ETA from this run's pace (a resumed run's first steps are not in it)
                    pace = elapsed / (step - first)
                    on_progress(StepProgress(step, request.steps, pace * step, loss=curve[-1]))
                if step % SAVE_EVERY == 0 and step < request.steps:
                    checkpoint.save(state, step, {"curve": curve, "seconds": seconds + elapsed})
                fault_point("relation.step")
        except Cancelled:
            checkpoint.save(state, step, {"curve": curve, "seconds": seconds + time.perf_counter() - started})
            raise
        from peft.utils import get_peft_model_state_dict

        weights = get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER)
        weights = {key: value.detach().float().cpu().contiguous() for key, value in weights.items()}
    return TrainedRelation(weights, tuple(curve), seconds + time.perf_counter() - started)


def draw_timesteps(count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0, …, T−1}, as DreamRelation trains."""
    return torch.randint(0, steps, (count,), generator=generator)


def _step(bundle, scheduler, data: EncodedExamples, request: RelationTrainRequest, record: AttentionRecord,
          optimiser, trainable, generator: torch.Generator) -> float:  # fmt: skip
    device, unet = bundle.device, bundle.pipe.unet
    count = data.latents.shape[0]
    index = torch.randperm(count, generator=generator)[: min(request.batch, count)]  # (B,)
    steps = scheduler.config.num_train_timesteps
    timesteps = draw_timesteps(len(index), steps, generator)  # (B,)
    clean = data.latents[index]  # (B, C, h, w)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = scheduler.add_noise(clean, noise, timesteps)  # (B, C, h, w)
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(clean, noise, timesteps) if kind == "v_prediction" else noise
    autocast = torch.autocast(device.type, dtype=unet.dtype) if unet.dtype != torch.float32 else nullcontext()
    with record.capture() as maps, autocast:
        prediction = unet(noisy.to(device, unet.dtype), timesteps.to(device), **_rows(data.condition, index)).sample
    prediction = prediction.float()
    loss = F.mse_loss(prediction, target.to(device))
    if request.keypoint_weight > 0:
        alphas = scheduler.alphas_cumprod[timesteps].to(device)  # (B,) ᾱ_t
        x0 = predicted_clean(noisy.to(device), prediction, alphas, kind)  # Eq. 5
        active = (timesteps <= steps * ACTIVE_SHARE).to(device)
        points, valid = data.points[index].to(device), data.valid[index].to(device)
        loss = loss + request.keypoint_weight * keypoint_matching_loss(
            x0, data.own[index].to(device), points, points, valid, active
        )
    if request.attention_weight > 0 and maps:
        probabilities = [m.float() for m, _ in maps]
        masks, positions = data.masks[index].to(device), data.positions[index].to(device)
        loss = loss + request.attention_weight * attention_loss(probabilities, positions, masks)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimiser.step()
    return float(loss.detach())


def teach_relation(bundle, request: RelationTrainRequest, library, on_progress=None, cancel=None,
                   overwrite: bool = False, examples: RelationExamples | None = None) -> RelationInfo:  # fmt: skip
    """Read the examples (every check before any work; `examples` when the caller read them already), train, and add
    the relation to `library`. A cancelled or killed run leaves only its checkpoint; the same request resumes it."""
    from engines.relations.examples import read_examples

    if not overwrite:
        library.check_free(request.name)
    if request.keypoint_weight is None:  # the family's weight (engines/types/relations.py), resolved before the key
        request = replace(request, keypoint_weight=keypoint_weight(bundle.family))
    examples = examples or read_examples(request.exemplars, request.name)
    key = hashlib.sha256(json.dumps({"request": {**asdict(request), "exemplars": examples.digest},
                                     "model": bundle.fingerprint, "family": bundle.family,
                                     "device": bundle.device.type}, sort_keys=True).encode()).hexdigest()  # fmt: skip
    trained = train_relation(bundle, request, examples, Checkpoint(library.work_dir(request.name), key),
                             on_progress, cancel)  # fmt: skip
    relation = examples.relation
    info = RelationInfo(
        name=request.name,
        relation=examples.words,
        template=relation.template,
        boxes=relation.boxes,
        layers=relation.layers,
        family=bundle.family,
        fingerprint=bundle.fingerprint,
        created=datetime.now(timezone.utc).isoformat(),
        steps=request.steps,
        rank=request.rank,
        keypoint_weight=request.keypoint_weight,
        examples=len(examples.examples),
        seconds=round(trained.seconds, 2),
        lora="",  # the library knows where it puts the file
        loss_curve=tuple(round(v, 5) for v in downsample_curve(trained.curve)),
    )
    fault_point("relation.trained")  # before the library write
    added = library.add(info, trained.weights, overwrite=overwrite)
    fault_point("relation.added")
    library.clear_work(request.name)
    return added
