"""Relation presets (DreamRelation): a prompt template, a default box arrangement and a default layer order.

A relation names how its subjects relate ("{a} hugging {b}", "{a} on top of {b}"). Picking one fills the prompt
and proposes one region per slot, which the person then moves on the canvas. The vocabulary is RelationBench's
25 relations (DreamRelation, supplementary "RelationBench" table: 14 single-object and 11 two-object prompts)
plus five spatial ones. A preset may name a relation LoRA (cross-attention q/k/v/out, DreamRelation §3); relations
learned from examples (engines/relations/training.py) live in the relation library and come back as presets too.

Torch-free on purpose: the UI imports this module to fill its relation picker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engines.presets import PRESETS_DIR, read_json, versioned_list
from engines.types import Box, InputError, Layout, Region, SubjectInfo, check_keys, check_subject_name, unknown_subject
from engines.types.checks import printable

DEFAULT_PATH = PRESETS_DIR / "relations.json"
KINDS: tuple[str, ...] = ("action", "interaction", "spatial")
SLOTS: tuple[str, ...] = ("a", "b")
_REQUIRED = {"name", "kind", "arity", "template", "boxes", "layers"}
_OPTIONAL = {"scene", "lora"}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SUBJECT = re.compile(r"<([^<>]*)>")  # <name>, the prompt syntax of a registered subject


@dataclass(frozen=True)
class Relation:
    name: str
    template: str  # "{a} hugging {b}": one placeholder per slot, each exactly once
    arity: int  # 1 or 2
    boxes: tuple[Box, ...]  # the default box of each slot, (x0, y0, x1, y1) in [0, 1]
    layers: tuple[int, ...]  # the default layer of each slot (0 = back)
    kind: str = "action"
    scene: str = ""  # a suggested setting ("in front of the mountain"); the person may replace it
    lora: Path | None = None  # a relation LoRA (.safetensors) or None

    def __post_init__(self) -> None:
        where = f"relation '{printable(str(self.name))}'"
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError("a relation needs a non-empty name")
        if self.arity not in (1, 2) or isinstance(self.arity, bool):
            raise InputError(f"{where}: arity must be 1 or 2 (got {self.arity!r})")
        if self.kind not in KINDS:
            raise InputError(f"{where}: kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if not isinstance(self.template, str):
            raise InputError(f"{where}: the template must be a string")
        found = _PLACEHOLDER.findall(self.template)
        wanted = list(SLOTS[: self.arity])
        if sorted(found) != wanted:
            raise InputError(
                f"{where}: the template must contain {' and '.join('{' + s + '}' for s in wanted)} "
                f"exactly once each and no other {{...}} (found {found})"
            )
        boxes = tuple(tuple(float(v) for v in _seq(box, where, "box")) for box in _seq(self.boxes, where, "boxes"))
        layers = tuple(_seq(self.layers, where, "layers"))
        if len(boxes) != self.arity or len(layers) != self.arity:
            raise InputError(f"{where}: needs exactly {self.arity} box(es) and {self.arity} layer(s)")
        for slot, box, layer in zip(SLOTS, boxes, layers, strict=False):
            Region(phrase=slot, box=box)  # the same checks as any region: inside the canvas, non-zero area
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise InputError(f"{where}: layer of slot {slot} must be an integer ≥ 0 (got {layer!r})")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "layers", layers)
        if not isinstance(self.scene, str):
            raise InputError(f"{where}: scene must be a string")

    @property
    def slots(self) -> tuple[str, ...]:
        return SLOTS[: self.arity]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "arity": self.arity,
            "template": self.template,
            "scene": self.scene,
            "boxes": [list(b) for b in self.boxes],
            "layers": list(self.layers),
            "lora": str(self.lora) if self.lora else None,
        }


def _seq(value: Any, where: str, what: str) -> Sequence:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: {what} must be a list")
    return value


def _lora_path(value: Any, base: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.endswith(".safetensors"):
        raise InputError(f"{where}: lora must be a .safetensors file name or null (got {value!r})")
    path = (base / value).resolve()
    if not path.is_relative_to(base.resolve()):
        raise InputError(f"{where}: lora {value!r} must stay inside {base}")
    return path


def parse_relations(data: Any, base: Path = PRESETS_DIR, origin: str = "relations") -> dict[str, Relation]:
    """Validate the JSON of a relations file; every problem is an InputError naming the relation and the key."""
    entries = versioned_list(data, origin, "relations")
    relations: dict[str, Relation] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
        where = f"{origin}: relation '{printable(str(name))}'"
        check_keys(entry, where, _REQUIRED | _OPTIONAL, _REQUIRED)
        try:
            relation = Relation(
                name=entry["name"],
                template=entry["template"],
                arity=entry["arity"],
                boxes=entry["boxes"],
                layers=entry["layers"],
                kind=entry["kind"],
                scene=entry.get("scene", ""),
                lora=_lora_path(entry.get("lora"), base, where),
            )
        except (TypeError, ValueError) as error:
            message = str(error)
            raise InputError(message if message.startswith(origin) else f"{origin}: {message}") from error
        if relation.name in relations:
            raise InputError(f"{origin}: relation '{relation.name}' is defined twice")
        relations[relation.name] = relation
    return relations


def load_relations(path: str | Path | None = None) -> dict[str, Relation]:
    """The relation presets of `path` (default presets/relations.json), validated; cached per file and mtime."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as error:
        raise InputError(f"cannot read relations file {path}: {error.strerror}") from error
    return dict(_load_cached(str(path.resolve()), stamp))


@lru_cache(maxsize=8)
def _load_cached(path: str, stamp: int) -> dict[str, Relation]:
    return parse_relations(read_json(path, "relations file"), base=Path(path).parent, origin=Path(path).name)


def get_relation(name: str, relations: Mapping[str, Relation] | None = None) -> Relation:
    relations = relations if relations is not None else load_relations()
    if name not in relations:
        raise InputError(f"unknown relation '{name}' (choose from {', '.join(relations)})")
    return relations[name]


Participant = str | SubjectInfo


def apply_relation(
    relation: Relation | str,
    participants: Sequence[Participant],
    scene: str = "",
    class_words: Mapping[str, str] | None = None,
) -> tuple[str, Layout]:
    """Fill the relation's prompt and propose one region per slot.

    A participant is a registered subject (a SubjectInfo, a name in `class_words`, or "<name>") or a plain phrase
    ("red ball"). Subjects are written `<name>` in the prompt and their region binds the subject with its class
    word as phrase; a phrase is written as words and its region binds those words.
    """
    if isinstance(relation, str):
        relation = get_relation(relation)
    class_words = dict(class_words or {})
    if len(participants) != relation.arity:
        raise InputError(f"'{relation.name}' relates {relation.arity} subject(s); got {len(participants)}")
    words: dict[str, str] = {}
    regions: list[Region] = []
    for slot, participant, box, layer in zip(
        relation.slots, participants, relation.boxes, relation.layers, strict=True
    ):
        name, phrase = _resolve(participant, class_words)
        words[slot] = f"<{name}>" if name else phrase
        regions.append(Region(phrase=phrase, box=box, subject=name, layer=layer))
    prompt = relation.template.format(**words)
    scene = " ".join(scene.split()) if isinstance(scene, str) else ""
    if scene:
        prompt = f"{prompt}{scene}" if scene[0] in ",;" else f"{prompt} {scene}"
    return prompt, Layout(tuple(regions))


def _resolve(participant: Participant, class_words: Mapping[str, str]) -> tuple[str | None, str]:
    """(subject name or None, phrase) of one participant."""
    if isinstance(participant, SubjectInfo):
        return participant.name, participant.class_word
    if not isinstance(participant, str) or not participant.strip():
        raise InputError("every slot of a relation needs a subject or a phrase")
    text = " ".join(participant.split())
    match = _SUBJECT.fullmatch(text)
    if match:
        name = check_subject_name(match.group(1))
        if name not in class_words:
            raise unknown_subject(name, class_words)
        return name, class_words[name]
    if text in class_words:
        return text, class_words[text]
    if "<" in text or ">" in text or "{" in text or "}" in text:
        raise InputError(f"phrase {text!r} may not contain <, >, {{ or }}")
    return None, text
