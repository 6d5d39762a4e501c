"""Textual-inversion embeddings: A1111, diffusers and SDXL `.safetensors` files, added to the model's tokenizers and
text encoders by diffusers' `load_textual_inversion`, and the rule by which a prompt names them.

The rule: an embedding is written as its file's stem, as A1111 does (`EasyNegative` for EasyNegative.safetensors),
or with ComfyUI's prefix (`embedding:EasyNegative`); whole words, in any case (CLIP lowercases text anyway). A
diffusers file saved under its default name (learned_embeds.safetensors) is named by the token inside it without
its angle brackets (`<cat-toy>` → `cat-toy`), because `<name>` in a Troupe prompt is a registered subject. A prompt
that names `<x>` while an embedding is also called x is refused: one word, two meanings.

Each vector becomes one token of the tokenizer(s) with an opaque name (`ti0v1easynegative`), and the prompt's word
becomes those tokens, in order, by the pipeline's own hook for this (`maybe_convert_prompt`, which both its
`encode_prompt` and Troupe's prompt parser call once per text). The hook is replaced on the loaded pipeline because
diffusers' own rewrites substrings case-sensitively: `easynegative` would silently get one vector, and a token
`bad` would rewrite `badge`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.prompts import SUBJECT_PATTERN
from engines.subject_files import read_safetensors
from engines.types import InputError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # what A1111 embedding files are called
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
DIFFUSERS_FILE_STEM = "learned_embeds"  # diffusers' default file name: the token inside names the embedding
SDXL_KEYS = ("clip_l", "clip_g")  # one tensor per text encoder, in the pipeline's order
MAX_VECTORS = 75  # a CLIP window holds 75 tokens besides BOS and EOS
TROUPE_SUBJECT_MARKS = ("troupe_subject", "troupe.subject.")  # engines/subject_files.py: metadata key, key prefix


@dataclass(frozen=True)
class Embedding:
    name: str  # the word a prompt writes
    tokens: tuple[str, ...]  # one added token per vector
    path: Path


def read_embedding(path: Path) -> tuple[str, list[torch.Tensor]]:
    """The name and the vectors (N, D) per text encoder of a textual-inversion file; every way a file can be wrong is
    one line naming it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{path.name}: Troupe loads embeddings only from .safetensors ({path.suffix} is a pickle "
                         "that can run code); use a .safetensors version of it")  # fmt: skip
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise InputError(f"embedding {path}: not an existing .safetensors file")
    metadata, tensors = read_safetensors(path)
    if TROUPE_SUBJECT_MARKS[0] in metadata or any(k.startswith(TROUPE_SUBJECT_MARKS[1]) for k in tensors):
        raise InputError(f"{path.name} is a Troupe subject, not an embedding: import it with "
                         f"python -m studio subjects import {path}")  # fmt: skip
    if set(SDXL_KEYS) <= set(tensors):
        vectors = [tensors[key] for key in SDXL_KEYS]
    elif len(tensors) == 1:  # A1111 `emb_params`, diffusers `<token>`, or any other single tensor
        vectors = list(tensors.values())
    else:
        shown = ", ".join(sorted(tensors)[:5])
        raise InputError(f"{path.name}: not a textual-inversion embedding (tensors: {shown or 'none'})")
    return _embedding_name(path, tensors), [_checked(v, path) for v in vectors]


def _embedding_name(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    name = path.stem
    if name == DIFFUSERS_FILE_STEM and len(tensors) == 1:
        name = next(iter(tensors)).strip("<>")
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(f"{path.name}: an embedding's name (its file's stem) must be 1-64 letters, digits or _ . + - "
                         f"and start with a letter or digit (got {name!r}); rename the file")  # fmt: skip
    return name


def _checked(vectors: torch.Tensor, path: Path) -> torch.Tensor:
    vectors = vectors[None] if vectors.dim() == 1 else vectors  # (D,) → (1, D)
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS or not vectors.is_floating_point():
        raise InputError(f"{path.name}: an embedding is 1-{MAX_VECTORS} float vectors; this file holds "
                         f"{vectors.dtype} of shape {tuple(vectors.shape)}")  # fmt: skip
    if not torch.isfinite(vectors).all():
        raise InputError(f"{path.name}: the embedding holds NaN or infinite values")
    return vectors.float()


def load_embeddings(pipe, files: Sequence[str]) -> tuple[Embedding, ...]:
    """Every file read and checked against the model first; then each added to every tokenizer and text encoder
    (SDXL: clip_l to the first, clip_g to the second) and the prompt rule installed on the pipeline."""
    if not files:
        return ()
    from transformers.utils import logging as transformers_logging

    pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in
             (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]  # fmt: skip
    pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]
    read = _read_all(files, [encoder.get_input_embeddings().weight.shape[-1] for _, encoder in pairs])
    embeddings = []
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # resizing the table logs how new rows start: they are overwritten
    try:
        for k, (name, vectors, path) in enumerate(read):
            slug = re.sub(r"[^a-z0-9]", "", name.lower())[:24]
            tokens = tuple(f"ti{k}v{i}{slug}" for i in range(vectors[0].shape[0]))
            for (tokenizer, encoder), per_encoder in zip(pairs, vectors):
                pipe.load_textual_inversion(per_encoder, token=list(tokens), tokenizer=tokenizer, text_encoder=encoder)
            embeddings.append(Embedding(name, tokens, path))
    finally:
        transformers_logging.set_verbosity(verbosity)
    pipe.maybe_convert_prompt = EmbeddingWords(tuple(embeddings))
    return tuple(embeddings)


def _read_all(files: Sequence[str], widths: list[int]) -> list[tuple[str, list[torch.Tensor], Path]]:
    """Every file read, fitted to the text encoders' widths and named apart, before any is added to the model."""
    read, seen = [], {}
    for file in files:
        path = Path(file).expanduser()
        name, vectors = read_embedding(path)
        if [v.shape[-1] for v in vectors] != widths:
            got = " + ".join(str(v.shape[-1]) for v in vectors)
            need = " + ".join(str(w) for w in widths)
            raise InputError(f"{path.name}: its vectors are {got} wide; this model's text encoders take {need} "
                             "(an embedding made for another model family)")  # fmt: skip
        if name.lower() in seen:
            raise InputError(f"two embeddings are called {name}: {seen[name.lower()].name} and {path.name}")
        seen[name.lower()] = path
        read.append((name, vectors, path))
    return read


class EmbeddingWords:
    """The pipeline's `maybe_convert_prompt(prompt, tokenizer)`: each embedding's word → its tokens (module doc)."""

    def __init__(self, embeddings: tuple[Embedding, ...]) -> None:
        self.embeddings = embeddings
        # Not after a letter, digit, `<` or `:` (ComfyUI's prefix is matched with the word), not before a letter,
        # digit, `>` or a dot that goes on with a word ("v1.5"): `<name>` stays a subject.
        self.patterns = [
            re.compile(rf"(?<![\w<>:.-])(?:embedding:)?{re.escape(e.name)}(?![\w<>-]|\.\w)", re.IGNORECASE)
            for e in embeddings
        ]
        self.names = {e.name.lower(): e for e in embeddings}

    def __call__(self, prompt: str | list[str], tokenizer=None) -> str | list[str]:
        if isinstance(prompt, list):
            return [self(p, tokenizer) for p in prompt]
        for match in SUBJECT_PATTERN.finditer(prompt):
            clash = self.names.get(match.group(1).lower())
            if clash is not None:
                raise InputError(f"<{match.group(1)}> is a subject, and the embedding {clash.path.name} has its name; "
                                 "rename the embedding file")  # fmt: skip
        for embedding, pattern in zip(self.embeddings, self.patterns):
            prompt = pattern.sub(" ".join(embedding.tokens), prompt)
        return prompt
