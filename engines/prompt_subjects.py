"""What the `<subjects>` a prompt names bring to a generation: their class words, their Cones 2 residuals (Eq. 6)
and their photos for reference attention (SynCD), gathered from the library once per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from engines.prompts import SUBJECT_PATTERN, ParsedPrompt
from engines.references import ReferencePhoto
from engines.types import InputError, unknown_subject

ENCODER_KEYS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class PromptSubjects:
    class_words: Mapping[str, str] = field(default_factory=dict)  # every subject the prompt names
    residuals: Mapping[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # those that have one: Δ per encoder
    photos: tuple[ReferencePhoto, ...] = ()  # every photo of every named subject that has some
    warnings: tuple[str, ...] = ()


def gather_subjects(prompt: str, library, family: str, fingerprint: str) -> PromptSubjects:
    """The subjects `prompt` names, checked against the loaded model: a residual only fits the text encoder it was
    trained on; photos fit any model. A subject whose photos are gone still generates from its residual."""
    names = sorted({m.group(1) for m in SUBJECT_PATTERN.finditer(prompt)})
    if not names:
        return PromptSubjects()
    known = {info.name: info for info in library.list()}
    class_words, residuals, photos, warnings = {}, {}, [], []
    for name in names:
        if name not in known:
            raise unknown_subject(name, known)
        info = known[name]
        class_words[name] = info.class_word
        if info.has_residual:
            library.check_compatible(name, family, fingerprint)
            residuals[name] = library.residuals(name)
        pairs = library.reference_photos(name)
        photos += [ReferencePhoto(name, info.class_word, photo, mask) for photo, mask in pairs]
        if not pairs and info.has_residual:
            warnings.append(f"<{name}> has no photos left: it is drawn from its trained residual alone")
        elif not pairs:
            raise InputError(f"<{name}> has neither photos nor a trained residual: register it again")
    return PromptSubjects(class_words, residuals, tuple(photos), tuple(warnings))


def add_residuals(prompt_embeds: torch.Tensor, parsed: ParsedPrompt, subjects: PromptSubjects,
                  widths: list[int]) -> torch.Tensor:  # fmt: skip
    """Cones 2 Eq. 6: c' = c + Δ at the class-word tokens of each occurrence of a subject that has a residual. The
    pipeline concatenates the encoders' outputs along features (SDXL: 768 + 1280), so Δ is concatenated in the same
    order. A subject written in a weighted group, `(<rex>:w)`, gets w·Δ: its words were weighted as e + (z − e)·w
    (engines/prompt_encoding.py), and e + (z + Δ − e)·w is exactly that plus w·Δ. prompt_embeds (B, T, ΣD) → same."""
    out = prompt_embeds.clone()
    names = ENCODER_KEYS[: len(widths)]
    for occurrence in parsed.subjects:
        if occurrence.name not in subjects.residuals:
            continue  # an instant subject: its photos carry it
        per_encoder = subjects.residuals[occurrence.name]
        delta = torch.cat([per_encoder[name] for name in names], dim=-1)  # (n_tokens, ΣD)
        if delta.shape != (len(occurrence.positions), sum(widths)):
            raise InputError(
                f"<{occurrence.name}> was registered with a class word of {delta.shape[0]} token(s) and "
                f"width {delta.shape[-1]}; here it is {len(occurrence.positions)} × {sum(widths)}"
            )
        if occurrence.weight != 1:
            delta = delta * occurrence.weight
        out[:, list(occurrence.positions)] += delta.to(out.device, out.dtype)
    return out
