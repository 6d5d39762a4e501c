"""Prompt syntax and token spans.

`<name>` stands for a registered subject and expands to its class word. Every region of a layout binds a set of
token positions of the (expanded) prompt: a subject region binds the class-word tokens of each `<name>`
occurrence; a phrase region binds every occurrence of its words that no subject already owns. Positions count the
BOS token as 0, exactly as the text encoder sees them, and are checked against every tokenizer of the model (SDXL
has two) so that residuals and guidance land on the same tokens in both encoders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engines.types import InputError, Layout, Region, unknown_subject

log = logging.getLogger(__name__)
SUBJECT_PATTERN = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]{0,39})>")


@dataclass(frozen=True)
class SubjectOccurrence:
    name: str
    positions: tuple[int, ...]  # token positions of its class word in the expanded prompt


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # the prompt with every <name> replaced by its class word
    subjects: tuple[SubjectOccurrence, ...]
    region_positions: tuple[tuple[int, ...], ...]  # per region of the layout, in the layout's order


def parse_prompt(prompt: str, layout: Layout, class_words: Mapping[str, str], tokenizers: Sequence) -> ParsedPrompt:
    """Expand subjects, then find every region's token positions; the first tokenizer's positions must match the
    others' (SDXL's two CLIP tokenizers share a vocabulary, so they do unless a custom model breaks that)."""
    text, subject_chars = expand_subjects(prompt, class_words)
    parsed = [_parse_with(tokenizer, text, subject_chars, layout) for tokenizer in tokenizers]
    if any(other != parsed[0] for other in parsed[1:]):
        raise InputError("the model's two tokenizers split this prompt differently; rephrase the region phrases")
    subjects, regions = parsed[0]
    return ParsedPrompt(text, subjects, regions)


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


def _parse_with(tokenizer, text: str, subject_chars: list[tuple[str, int, int]], layout: Layout):
    encoding = tokenizer(text, return_offsets_mapping=True, truncation=False)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    window = tokenizer.model_max_length - 1  # the last place holds EOS
    if len(ids) > tokenizer.model_max_length:
        log.warning("prompt is %d tokens; the text encoder sees only the first %d", len(ids), window - 1)
    subjects = tuple(
        SubjectOccurrence(name, positions_in_chars(offsets, start, end)) for name, start, end in subject_chars
    )
    for subject in subjects:
        if not subject.positions or max(subject.positions) >= window:
            raise InputError(
                f"<{subject.name}> lies beyond the text encoder's {window - 1}-token window; "
                "shorten the prompt or name the subject earlier"
            )
    owned_by_subjects = {p for s in subjects for p in s.positions}
    regions = tuple(_region_positions(tokenizer, region, ids, subjects, owned_by_subjects) for region in layout.regions)
    _check_regions(layout.regions, regions, window)
    return subjects, regions


def positions_in_chars(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, ...]:
    return tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)


def _region_positions(tokenizer, region: Region, ids, subjects, owned_by_subjects) -> tuple[int, ...]:
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
    found = [
        tuple(range(i, i + len(words)))
        for i in range(1, len(ids) - len(words) + 1)
        if list(ids[i : i + len(words)]) == list(words)
    ]
    free = [span for span in found if not owned_by_subjects.intersection(span)]
    if not free:
        where = "only as part of a subject; bind the region to that subject instead" if found else "not in the prompt"
        raise InputError(f"region phrase '{region.phrase}' is {where}")
    return tuple(p for span in free for p in span)


def _check_regions(regions: Sequence[Region], positions: Sequence[tuple[int, ...]], window: int) -> None:
    for i, (region, mine) in enumerate(zip(regions, positions)):
        if max(mine) >= window:
            raise InputError(
                f"region '{region.label}' binds words beyond the text encoder's {window - 1}-token window;"
                " shorten the prompt or move those words earlier"
            )
        for other, theirs in zip(regions[i + 1 :], positions[i + 1 :]):
            if set(mine) & set(theirs):
                raise InputError(
                    f"regions '{region.label}' and '{other.label}' bind the same words of the prompt; "
                    "make their phrases distinct"
                )
