"""The demo model's CLIP BPE vocabulary: every world word (and common prompt words) is one token; every printable
ASCII character exists as "c" and "c</w>", so any ASCII text tokenizes (unknown words fall back to pieces).

Merges are built so that CLIP's greedy BPE (lowest-rank pair first) turns each listed word into exactly one token:
for each word we simulate BPE with the merges so far and, while it is still in several pieces, append the merge
of its first two pieces. Appended merges have the largest ranks, so they never fire inside words that already
complete with earlier merges (at every step of those words a lower-rank merge applies) — earlier words keep their
single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from .scenes import BACKGROUND_PHRASES, BACKGROUNDS, CATEGORIES, COLOURS, PATTERNS, RELATIONS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

COMMON_WORDS = """
a an the and or of on in at to with by from for is are it its this that these
photo picture image painting drawing render rendering style
top next front inside behind beside near above below under over between left right middle center
hugging riding holding sitting standing lying jumping playing carrying chasing kissing facing looking
dog cat bird horse person man woman child boy girl teddy bear toy mug cup car bike bicycle ball box tent
beach grass sky sand night park street room table field forest snow water sea city garden
stripes stripe striped dots dot dotted spots plain pattern patterned
red blue yellow purple orange cyan green white black pink brown gray grey gold silver
big small large tiny little round square triangle circle disc disk donut star ring
one two three four five several many
background scene high quality best detailed blurry ugly bad worst low
""".split()


def world_words() -> list[str]:
    words: list[str] = []
    words += list(BACKGROUNDS) + list(CATEGORIES) + list(COLOURS) + list(PATTERNS)
    for phrase in list(RELATIONS) + [p for ps in BACKGROUND_PHRASES.values() for p in ps]:
        words += phrase.split()
    words += COMMON_WORDS
    out, seen = [], set()
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _printable() -> list[str]:
    return [chr(i) for i in range(33, 127)]  # CLIP's byte encoder maps these bytes to themselves


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lowercased word: pieces = chars, the last one with "</w>"; merge lowest rank first."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = next((pieces[i], pieces[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(pieces):  # merge every occurrence of (a, b), left to right, as CLIP does
            if i < len(pieces) - 1 and pieces[i] == a and pieces[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = world_words() if words is None else words
    tokens: list[str] = []
    for c in _printable():
        tokens += [c, c + "</w>"]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while True:
            pieces = _bpe(w, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json for CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = dict(
        special,
        model_max_length=77,
        do_lower_case=True,
        tokenizer_class="CLIPTokenizer",
        clean_up_tokenization_spaces=False,
        errors="replace",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
