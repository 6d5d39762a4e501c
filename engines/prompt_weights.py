"""A1111's attention syntax: which words of a prompt carry which weight.

    (words)        × 1.1            [words]       ÷ 1.1            (words:1.3)   × 1.3
    ((words))      × 1.21           \\( \\) \\[ \\]  the bracket itself, as text

Groups nest and multiply. `<name>` subjects may sit inside a group: `(<rex>:1.3)` weighs rex's class word and its
residual. A bracket with no partner is read as the character itself: a lone `)` as A1111 reads it, and — unlike
A1111, which weighs the rest of the prompt × 1.1 after an unclosed `(` — a lone `(` too, because an unclosed
bracket is far more often a typo or a smiley than an intended emphasis. A1111's prompt editing (`[a:b:0.5]`,
`[a|b]`) and `BREAK` are not syntax here: they reach the text encoder as the words they are.

compel (the maintained library for weighted prompts, used by engines/prompt_encoding.py to encode them) reads
InvokeAI's syntax, not this one: to it `(word:1.2)` and `[word]` are literal text and `word-`/`word+` are weights
(damian0815/compel issues 15 and 16), so an A1111 prompt cannot go through its parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1  # A1111's factor for one pair of round brackets (square brackets divide by it)

_SYNTAX = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])                                # \( \) \[ \] \\ : the character itself
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)        # (words:1.3) closes its group with a weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0


@dataclass
class _Item:  # one piece of the scanned prompt, while brackets are being paired
    kind: str  # "text", "open", "close"
    text: str
    bracket: str = ""  # "(" or "[" for brackets
    factor: float = 1.0  # what a paired bracket multiplies by
    paired: bool = False


def parse_weights(prompt: str) -> tuple[Fragment, ...]:
    """The prompt as runs of text with one weight each (neighbours of equal weight merged, empty runs dropped)."""
    items = _pair(_scan(prompt))
    fragments: list[Fragment] = []
    active: list[float] = []  # the factors of the groups the scan is inside, outermost first
    for item in items:
        if item.kind == "open" and item.paired:
            active.append(item.factor)
            continue
        if item.kind == "close" and item.paired:
            active.remove(item.factor)  # any equal factor: the product is the same whichever goes
            continue
        weight = 1.0
        for factor in active:
            weight *= factor
        if fragments and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + item.text, weight)
        elif item.text:
            fragments.append(Fragment(item.text, weight))
    return tuple(fragment for fragment in fragments if fragment.text)


def is_plain(prompt: str) -> bool:
    """True when the syntax changes nothing: the text encoder reads the prompt exactly as written."""
    return parse_weights(prompt) == ((Fragment(prompt, 1.0),) if prompt else ())


def strip_weights(prompt: str) -> str:
    """The words a weighted prompt says, without its syntax."""
    return "".join(fragment.text for fragment in parse_weights(prompt))


def _scan(prompt: str) -> list[_Item]:
    items = []
    for match in _SYNTAX.finditer(prompt):
        if match.group("escaped") is not None:
            items.append(_Item("text", match.group("escaped")))
        elif match.group("open") is not None:
            items.append(_Item("open", match.group(0), bracket=match.group(0)))
        elif match.group("weight") is not None:
            items.append(_Item("close", match.group(0), bracket="(", factor=float(match.group("weight"))))
        elif match.group("close") is not None:
            items.append(_Item("close", match.group(0), bracket="(" if match.group(0) == ")" else "["))
        else:
            items.append(_Item("text", match.group(0)))
    return items


def _pair(items: list[_Item]) -> list[_Item]:
    """Pair each closing bracket with the latest open one of its shape (round and square pair independently, as
    in A1111); a group's factor comes from its closer (`:1.3)`) or its shape. Unpaired brackets become text."""
    open_ones: dict[str, list[_Item]] = {"(": [], "[": []}
    for item in items:
        if item.kind == "open":
            open_ones[item.bracket].append(item)
        elif item.kind == "close" and open_ones[item.bracket]:
            opener = open_ones[item.bracket].pop()
            if item.text == ")":
                item.factor = EMPHASIS
            elif item.text == "]":
                item.factor = 1 / EMPHASIS
            opener.factor, opener.paired, item.paired = item.factor, True, True
    for item in items:
        if item.kind != "text" and not item.paired:
            item.kind = "text"
    return items
