"""Relation presets: the shipped file is valid, bad files fail clearly, apply_relation fills prompt and layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines.relations import Relation, apply_relation, get_relation, load_relations, parse_relations
from engines.types import InputError, SubjectInfo

ROOT = Path(__file__).resolve().parents[2]
RELATION_BENCH = (
    "playing guitar",
    "playing piano",
    "eating dinner",
    "dancing",
    "lifting weights",
    "reading a book",
    "skiing",
    "sleeping in a hammock",
    "cooking",
    "singing",
    "riding a bike",
    "riding a horse",
    "riding a motorbike",
    "playing soccer",
    "playing chess with",
    "partner dancing with",
    "carrying",
    "fencing with",
    "shaking hands with",
    "kissing",
    "playing basketball with",
    "wrestling with",
    "hugging",
    "fighting with",
    "sitting back to back with",
)
SPATIAL = ("on top of", "next to", "in front of", "inside", "behind")


def _subject(name: str, class_word: str) -> SubjectInfo:
    return SubjectInfo(name=name, class_word=class_word, family="demo", fingerprint="x", created="2026-01-01", steps=1)


def _one(**overrides) -> dict:
    entry = {
        "name": "hugging",
        "kind": "interaction",
        "arity": 2,
        "template": "{a} hugging {b}",
        "boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
        "layers": [1, 0],
    }
    entry.update(overrides)
    return {"version": 1, "relations": [entry]}


def test_shipped_file_has_relationbench_and_spatial_relations():
    relations = load_relations()
    assert set(RELATION_BENCH) | set(SPATIAL) == set(relations)
    assert sum(r.arity == 1 for r in relations.values()) == 14  # RelationBench: 14 single-object prompts
    assert sum(r.arity == 2 for r in relations.values()) == 11 + len(SPATIAL)
    for relation in relations.values():
        assert len(relation.boxes) == relation.arity == len(relation.layers)
        assert relation.lora is None  # none shipped


def test_apply_relation_with_subjects_and_phrases():
    hugging = get_relation("hugging")
    prompt, layout = apply_relation(hugging, [_subject("rex", "dog"), "red ball"], scene="on the beach")
    assert prompt == "<rex> hugging red ball on the beach"
    first, second = layout.regions
    assert (first.subject, first.phrase, first.box, first.layer) == ("rex", "dog", hugging.boxes[0], hugging.layers[0])
    assert (second.subject, second.phrase, second.layer) == (None, "red ball", hugging.layers[1])


def test_apply_relation_by_name_with_class_word_mapping():
    prompt, layout = apply_relation("on top of", ["<milo>", "rex"], class_words={"milo": "cat", "rex": "dog"})
    assert prompt == "<milo> on top of <rex>"
    assert [(r.subject, r.phrase) for r in layout.regions] == [("milo", "cat"), ("rex", "dog")]
    assert layout.back_to_front()[-1].subject == "milo"  # on top = in front


def test_apply_relation_single_slot_and_scene_punctuation():
    prompt, layout = apply_relation("riding a horse", ["a knight"], scene=", at dawn")
    assert prompt == "a knight riding a horse, at dawn"
    assert len(layout.regions) == 1


@pytest.mark.parametrize(
    "participants, message",
    [
        (["rex"], "relates 2"),
        (["<ghost>", "cat"], "no subject named <ghost>"),
        (["", "cat"], "needs a subject or a phrase"),
        (["a {b}", "cat"], "may not contain"),
    ],
)
def test_apply_relation_bad_participants(participants, message):
    with pytest.raises(InputError, match=message):
        apply_relation("hugging", participants, class_words={"rex": "dog"})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"relations": []}, "non-empty list"),
        ({"version": 1, "relations": [], "extra": 1}, "unknown keys extra"),
        (_one(colour="red"), "unknown keys colour"),
        (_one(arity=3), "arity must be 1 or 2"),
        (_one(template="{a} hugs"), "exactly once"),
        (_one(template="{a} hugs {b} and {c}"), "exactly once"),
        (_one(boxes=[[0, 0, 0.5, 1]]), "exactly 2 box"),
        (_one(boxes=[[0, 0, 0, 1], [0.5, 0, 1, 1]]), "zero area"),
        (_one(boxes=[[0, 0, 1.5, 1], [0.5, 0, 1, 1]]), "inside the canvas"),
        (_one(layers=[1, -1]), "layer of slot b"),
        (_one(kind="mood"), "kind must be"),
        (_one(lora="../../etc/passwd.safetensors"), "must stay inside"),
        (_one(lora="x.bin"), "safetensors"),
        (_one(name="hug\x1b[2J\x1e", boxes=[]), r"relation 'hug\\x1b\[2J\\x1e': needs exactly 2"),  # escaped: one line
    ],
)
def test_bad_relation_files_fail_clearly(data, message):
    with pytest.raises(InputError, match=message):
        parse_relations(data)


def test_duplicate_and_unreadable_files(tmp_path):
    data = _one()
    data["relations"] *= 2
    with pytest.raises(InputError, match="defined twice"):
        parse_relations(data)
    bad = tmp_path / "relations.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_relations(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_relations(tmp_path / "missing.json")


def test_custom_file_with_lora(tmp_path):
    path = tmp_path / "relations.json"
    path.write_text(json.dumps(_one(lora="hug.safetensors")))
    relation = load_relations(path)["hugging"]
    assert isinstance(relation, Relation) and relation.lora == (tmp_path / "hug.safetensors").resolve()
    assert relation.to_dict()["lora"].endswith("hug.safetensors")


def test_relations_module_is_torch_free():
    code = "import sys, engines.relations; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
