"""The sentence bank C_class of Cones 2 (papers/cones2.txt §3.2): sentences that contain the class word.

L_reg (Eq. 3) pins the frozen encoder's outputs at every other position of these sentences, and Δ (Eq. 5) is the
mean shift of the class word's outputs over them. The paper draws its 1,000 sentences from a language model; here
they are filled in from presets/sentence_templates.json, deterministically for a class word, so no network is needed
and the same class word always gets the same bank. Every tenth sentence is held out of L_reg to measure preservation
on sentences the encoder was never pinned on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.presets import PRESETS_DIR, read_json
from engines.types import InputError, check_keys

TEMPLATES_PATH = PRESETS_DIR / "sentence_templates.json"
TRAIN_PROMPT = "a photo of {cls}"  # the paper's D_s caption: the bare class word, no rare identifier (notes §1.2)
HELDOUT_EVERY = 10  # every 10th bank sentence never enters L_reg: it measures preservation on unseen sentences

_SLOT = re.compile(r"\{(\w+)\}")
_WORD_LISTS = frozenset({"scene", "style", "style_adj", "attribute", "relation", "other"})  # what {slot}s draw from
_TEMPLATE_KEYS = frozenset({"format_version", "about", "frames"}) | _WORD_LISTS


def load_sentence_templates(path: Path = TEMPLATES_PATH) -> dict[str, Any]:
    """Read and validate presets/sentence_templates.json (unknown keys, bad slots → InputError)."""
    data = check_keys(read_json(path, "sentence templates"), "sentence templates", _TEMPLATE_KEYS, _TEMPLATE_KEYS)
    if data["format_version"] != 1:
        raise InputError("sentence templates: format_version must be 1")
    for key in _WORD_LISTS | {"frames"}:
        values = data[key]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise InputError(f"sentence templates: '{key}' must be a non-empty list of non-empty strings")
        if key != "frames" and any("{" in v or "}" in v for v in values):
            raise InputError(f"sentence templates: '{key}' values cannot contain braces")
    for frame in data["frames"]:
        used = _SLOT.findall(frame)
        if used.count("cls") != 1:
            raise InputError(f"sentence template {frame!r} must contain {{cls}} exactly once")
        unknown = set(used) - _WORD_LISTS - {"cls", "a"}
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
    # a filler that repeats the class word ("a dog next to a dog") would put it in the sentence twice
    pools = {key: [v for v in data[key] if not (words & set(v.lower().split()))] or data[key] for key in _WORD_LISTS}
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
        # {a} becomes "a" or "an" by the word that follows it
        text = re.sub("\x00 (\\S)", lambda m: ("an " if m.group(1).lower() in "aeiou" else "a ") + m.group(1), text)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise InputError(f"the sentence templates give only {len(out)} distinct sentences (need {n})")
    return out


def split_bank(sentences: list[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(training, held-out): every `every`-th sentence is held out of L_reg."""
    return (
        [s for i, s in enumerate(sentences) if i % every != every - 1],
        [s for i, s in enumerate(sentences) if i % every == every - 1],
    )


@dataclass(frozen=True)
class TokenizedBank:
    """Sentences tokenized by every tokenizer of the model, with where the class word's tokens start."""

    sentences: tuple[str, ...]
    ids: tuple[torch.Tensor, ...]  # per tokenizer (N, L) int64
    class_pos: tuple[torch.Tensor, ...]  # per tokenizer (N,) start of the class tokens


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
        ids = tokenizer(
            sentences, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (N, L)
        windows = ids.unfold(1, len(cls), 1)  # (N, L − n + 1, n)
        hits = (windows == torch.tensor(cls)).all(-1)  # (N, L − n + 1)
        found = hits.any(1)  # (N,)
        pos = hits.float().argmax(1)  # (N,) first occurrence
        keep &= found.numpy()
        all_ids.append(ids)
        all_pos.append(pos)
    index = torch.from_numpy(np.nonzero(keep)[0])  # (N',)
    if len(index) == 0:
        raise InputError(f"the class word {class_word!r} does not fit in the text encoder's window")
    return TokenizedBank(
        tuple(sentences[i] for i in index.tolist()), tuple(x[index] for x in all_ids), tuple(p[index] for p in all_pos)
    )


def class_mask(pos: torch.Tensor, n_class: int, length: int) -> torch.Tensor:
    """(N, L) bool, True at the class-token positions."""
    arange = torch.arange(length)[None]  # (1, L)
    return (arange >= pos[:, None]) & (arange < pos[:, None] + n_class)


def class_positions(bank: TokenizedBank, n_class: tuple[int, ...]) -> torch.Tensor:
    """(N, L) bool: positions that hold the class word for any of the tokenizers (SDXL has two)."""
    length = bank.ids[0].shape[1]
    found = torch.zeros(bank.ids[0].shape, dtype=torch.bool)  # (N, L)
    for pos, n in zip(bank.class_pos, n_class):
        found |= class_mask(pos, n, length)
    return found
