"""Prompt syntax and token spans.

`<name>` stands for a registered subject and expands to its class word; A1111's weighting syntax
(engines/prompt_weights.py) gives runs of words a weight. Every region of a layout binds a set of token positions
of the (expanded) prompt: a subject region binds the class-word tokens of each `<name>` occurrence; a phrase region
binds every occurrence of its words that no subject already owns. Positions index the sequence the UNet's
cross-attention sees: a prompt longer than the text encoder's window is read in windows of `model_max_length - 2`
tokens, each wrapped in its own BOS and EOS (as A1111 and compel do) and their outputs concatenated, so token i of
the prompt (0-based, without BOS) sits at `window_start(i // W) + 1 + i % W` with W = model_max_length - 2 — plain
i + 1 in the first window, exactly as before. Positions are checked against every tokenizer of the model (SDXL has
two) so that residuals and guidance land on the same tokens in both encoders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engines.prompt_weights import Fragment, is_plain, parse_weights
from engines.types import InputError, Layout, Region, unknown_subject

SUBJECT_PATTERN = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]{0,39})>")
MAX_WINDOWS = 16  # 1,200 tokens for CLIP: far past any prompt people write, short of an accidental paste of a file


class _LongPromptNote(logging.Filter):
    """transformers warns, once per tokenizer, that a text over 77 tokens "will result in indexing errors"; Troupe
    reads such a prompt in windows, so the line would only mislead. Raised by any tokenizer call on the text,
    diffusers' textual-inversion hook included, so it is filtered rather than asked not to be said."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token indices sequence length is longer than" not in record.getMessage()


logging.getLogger("transformers.tokenization_utils_base").addFilter(_LongPromptNote())

# The text a tokenizer reads for some words (diffusers' textual-inversion loader expands a multi-vector token into
# several here); the identity when the model has no such tokens.
Convert = Callable[[str, object], str]


@dataclass(frozen=True)
class SubjectOccurrence:
    name: str
    positions: tuple[int, ...]  # token positions of its class word in the (windowed) sequence
    weight: float = 1.0  # the weight of the group it was written in: scales its residual with its words


@dataclass(frozen=True)
class TokenizedPrompt:
    """What one tokenizer makes of the prompt: every token without BOS/EOS, and the weight of each."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    window: int  # tokens per window: model_max_length - 2

    @property
    def windows(self) -> int:
        return max(1, -(-len(self.ids) // self.window))


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # the prompt with every <name> replaced by its class word and the weighting syntax taken out
    subjects: tuple[SubjectOccurrence, ...]
    region_positions: tuple[tuple[int, ...], ...]  # per region of the layout, in the layout's order
    tokens: tuple[TokenizedPrompt, ...] = ()  # per tokenizer
    plain: bool = True  # no weighting syntax: `text` alone says what the encoder must read

    @property
    def windows(self) -> int:
        return self.tokens[0].windows if self.tokens else 1


def position(index: int, window: int) -> int:
    """Where token `index` of the prompt (0-based, BOS not counted) sits in the windowed sequence."""
    return (index // window) * (window + 2) + 1 + index % window


def parse_prompt(prompt: str, layout: Layout, class_words: Mapping[str, str] | None, tokenizers: Sequence,
                 convert: Convert | None = None) -> ParsedPrompt:  # fmt: skip
    """Expand subjects (none when `class_words` is None: a negative prompt), then find every region's token
    positions; the first tokenizer's positions must match the others' (SDXL's two CLIP tokenizers share a
    vocabulary, so they do unless a custom model breaks that)."""
    fragments = parse_weights(prompt)
    parsed = [_parse_with(tokenizer, fragments, class_words, layout, convert) for tokenizer in tokenizers]
    if any(other[:2] != parsed[0][:2] or len(other[2].ids) != len(parsed[0][2].ids) for other in parsed[1:]):
        raise InputError("the model's two tokenizers split this prompt differently; rephrase the region phrases")
    subjects, regions, _ = parsed[0]
    text = "".join(expand_subjects(f.text, class_words)[0] if class_words is not None else f.text for f in fragments)
    return ParsedPrompt(text, subjects, regions, tuple(p[2] for p in parsed), is_plain(prompt))


def expand_subjects(prompt: str, class_words: Mapping[str, str]) -> tuple[str, list[tuple[str, int, int]]]:
    """Replace each <name> by its class word; return the text and (name, start, end) character ranges."""
    pieces, ranges, cursor, length = [], [], 0, 0
    for match in SUBJECT_PATTERN.finditer(prompt):
        name = match.group(1)
        if name not in class_words:
            raise unknown_subject(name, class_words)
        before = prompt[cursor : match.start()]
        pieces += [before, class_words[name]]
        length += len(before)
        ranges.append((name, length, length + len(class_words[name])))
        length += len(class_words[name])
        cursor = match.end()
    pieces.append(prompt[cursor:])
    return "".join(pieces), ranges


def tokenize(tokenizer, fragments: Sequence[Fragment], class_words: Mapping[str, str] | None,
             convert: Convert | None = None) -> tuple[TokenizedPrompt, list[tuple[str, tuple[int, ...], float]]]:  # fmt: skip
    """Each fragment tokenized on its own (as A1111 and compel do), subjects expanded inside it; returns the tokens
    and every subject occurrence as (name, token indices without BOS, weight)."""
    ids, weights, found = [], [], []
    for fragment in fragments:
        raw = convert(fragment.text, tokenizer) if convert is not None else fragment.text
        text, subject_chars = expand_subjects(raw, class_words) if class_words is not None else (raw, [])
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        for name, start, end in subject_chars:
            indices = tuple(len(ids) + i for i in positions_in_chars(encoding.offset_mapping, start, end))
            found.append((name, indices, fragment.weight))
        ids += encoding.input_ids
        weights += [fragment.weight] * len(encoding.input_ids)
    window = tokenizer.model_max_length - 2
    tokens = TokenizedPrompt(tuple(ids), tuple(weights), window)
    if tokens.windows > MAX_WINDOWS:
        raise InputError(f"the prompt is {len(ids)} tokens; Troupe reads at most {MAX_WINDOWS * window}")
    return tokens, found


def _parse_with(tokenizer, fragments, class_words, layout: Layout, convert: Convert | None):
    tokens, found = tokenize(tokenizer, fragments, class_words, convert)
    window = tokens.window
    subjects = tuple(
        SubjectOccurrence(name, tuple(position(i, window) for i in indices), weight) for name, indices, weight in found
    )
    for subject in subjects:
        if not subject.positions:
            raise InputError(f"<{subject.name}>'s class word has no tokens for this model's tokenizer")
    owned_by_subjects = {p for s in subjects for p in s.positions}
    regions = tuple(
        _region_positions(tokenizer, region, tokens, subjects, owned_by_subjects) for region in layout.regions
    )
    _check_regions(layout.regions, regions)
    return subjects, regions, tokens


def positions_in_chars(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, ...]:
    return tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)


def _region_positions(
    tokenizer, region: Region, tokens: TokenizedPrompt, subjects, owned_by_subjects
) -> tuple[int, ...]:
    if region.subject is not None:
        positions = tuple(p for s in subjects if s.name == region.subject for p in s.positions)
        if not positions:
            raise InputError(
                f"a region is placed for <{region.subject}>, but the prompt does not mention <{region.subject}>"
            )
        return positions
    words = tokenizer(region.phrase, add_special_tokens=False).input_ids
    if not words:
        raise InputError(f"region phrase '{region.phrase}' has no words")
    ids, n = list(tokens.ids), len(words)
    found = [
        tuple(position(j, tokens.window) for j in range(i, i + n))
        for i in range(len(ids) - n + 1)
        if ids[i : i + n] == list(words)
    ]
    free = [span for span in found if not owned_by_subjects.intersection(span)]
    if not free:
        where = "only as part of a subject; bind the region to that subject instead" if found else "not in the prompt"
        raise InputError(f"region phrase '{region.phrase}' is {where}")
    return tuple(p for span in free for p in span)


def _check_regions(regions: Sequence[Region], positions: Sequence[tuple[int, ...]]) -> None:
    for i, (region, mine) in enumerate(zip(regions, positions)):
        for other, theirs in zip(regions[i + 1 :], positions[i + 1 :]):
            if set(mine) & set(theirs):
                raise InputError(
                    f"regions '{region.label}' and '{other.label}' bind the same words of the prompt; "
                    "make their phrases distinct"
                )
