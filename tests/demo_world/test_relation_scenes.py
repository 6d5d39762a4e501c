"""Learned-relation scenes ("leaning on", "in the middle of") and their geometry scorer, on rendered images only
(no model, no autoencoder): the scorer accepts the relation and rejects the same pairs in other poses; the example
folders follow engines/relations/examples.py's schema, byte for byte the same from the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from demo_world.relation_scenes import (
    CONTROL_KINDS,
    IN_THE_MIDDLE_OF,
    KEYPOINTS_LOCAL,
    LEANING_ON,
    TEMPLATES,
    TILT_RANGE,
    all_pairs,
    render_control,
    render_relation,
    rotated_pattern_mask,
    rotated_shape_mask,
    split_pairs,
    write_relation_folder,
)
from demo_world.relation_scorer import TILT_MIN_DEGREES, measure_tilt, score_relation
from demo_world.scenes import SIZE, pattern_mask, shape_mask

RELATIONS = (LEANING_ON, IN_THE_MIDDLE_OF)
SEEDS = range(100)


def _score(scene):
    a, b = scene.objects
    return score_relation(scene.image, scene.relation, a.spec.colour, b.spec.colour)


@pytest.mark.parametrize("relation", RELATIONS)
def test_scorer_accepts_rendered_relation(relation):
    scores = [_score(render_relation(relation, seed)) for seed in SEEDS]
    assert all(s.found for s in scores)
    assert np.mean([s.correct for s in scores]) >= 0.95


@pytest.mark.parametrize("relation", RELATIONS)
def test_scorer_rejects_controls_of_the_same_pairs(relation):
    kinds = CONTROL_KINDS[relation]
    by_kind: dict[str, list[bool]] = {kind: [] for kind in kinds}
    for seed in SEEDS:
        pair = render_relation(relation, seed).pair
        kind = kinds[seed % len(kinds)]
        control = render_control(relation, kind, seed, pairs=[pair])
        assert control.pair == pair and control.kind == kind
        score = _score(control)
        assert score.found
        by_kind[kind].append(score.correct)
    assert np.mean([c for cs in by_kind.values() for c in cs]) <= 0.05
    for kind, correct in by_kind.items():
        assert np.mean(correct) <= 0.1, kind


def test_leaning_geometry_is_what_the_scorer_reads():
    for seed in range(40):
        scene = render_relation(LEANING_ON, seed)
        a, b = scene.objects
        low, high = TILT_RANGE[a.spec.category]
        assert low <= abs(a.angle) <= high and a.spec.category in ("box", "tent") and b.spec.category != "ring"
        score = _score(scene)
        assert abs(score.tilt_degrees - abs(a.angle)) <= 4.0  # measured on the detected mask
        assert score.contact and score.tilt_degrees >= TILT_MIN_DEGREES
        upright = _score(render_control(LEANING_ON, "upright", seed, pairs=[scene.pair]))
        assert upright.contact and upright.tilt_degrees < 3.0


def test_middle_geometry():
    for seed in range(40):
        scene = render_relation(IN_THE_MIDDLE_OF, seed)
        a, b = scene.objects
        assert not (a.mask & b.mask).any() and a.mask.sum() == shape_mask(a.spec.category, a.spec.cx, a.spec.cy,
                                                                           a.spec.size).sum()  # fmt: skip
        assert 28 <= b.spec.size <= 40 and a.spec.size < b.spec.size
        assert np.hypot(a.spec.cx - b.spec.cx, a.spec.cy - b.spec.cy) <= 1.5 * np.sqrt(2)
        hole = shape_mask(b.spec.category, b.spec.cx, b.spec.cy, b.spec.size) & ~b.mask
        assert (hole == a.mask).all()  # A lies fully inside B's shape


def test_rotated_masks_match_scenes_at_zero_and_turn_with_the_object():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cx, cy, size = (float(v) for v in rng.uniform([16, 16, 10], [48, 48, 30]))
        for category in ("box", "tent", "ball", "ring", "star"):
            assert (rotated_shape_mask(category, cx, cy, size, 0.0) == shape_mask(category, cx, cy, size)).all()
        for pattern in ("plain", "striped", "dotted"):
            assert (rotated_pattern_mask(pattern, cx, cy, 0.0) == pattern_mask(pattern, cx, cy)).all()
        angle = float(rng.uniform(-40, 40))
        for category in ("box", "tent"):
            turned = rotated_shape_mask(category, cx, cy, size, angle)
            flat = shape_mask(category, cx, cy, size)
            assert abs(int(turned.sum()) - int(flat.sum())) <= 0.1 * flat.sum() + 4  # area kept
            assert abs(measure_tilt(turned) - abs(angle)) <= 4.0
        stripes = rotated_pattern_mask("striped", cx, cy, 45.0)  # [64, 64]: diagonal stripes turned 45 deg lie flat
        assert np.mean([row.all() or not row.any() for row in stripes]) >= 0.95


def test_keypoints_are_consistent_and_on_the_object():
    for relation in RELATIONS:
        for seed in range(20):
            for obj in render_relation(relation, seed).objects:
                kp = np.array(obj.keypoints)  # [5, 2] in [0, 1]
                assert kp.shape == (len(KEYPOINTS_LOCAL[obj.spec.category]), 2) == (5, 2)
                assert (kp >= 0).all() and (kp <= 1).all()
                full = rotated_shape_mask(obj.spec.category, obj.spec.cx, obj.spec.cy, obj.spec.size, obj.angle)
                ys, xs = np.nonzero(full)
                # each keypoint on the shape's pixels or its rim; sharp tips (star, tent apex: thinner than a pixel
                # near the end) end up to ~2.1 px from the nearest pixel centre
                px = kp * SIZE  # [5, 2] pixels
                gaps = np.hypot(xs[None] + 0.5 - px[:, :1], ys[None] + 0.5 - px[:, 1:]).min(1)  # [5]
                assert (gaps <= (2.5 if obj.spec.category in ("star", "tent") else 1.5)).all(), (relation, seed)
                x0, y0, x1, y1 = obj.box
                assert x0 <= kp[:, 0].min() + 0.03 and kp[:, 0].max() - 0.03 <= x1 and y0 <= kp[:, 1].min() + 0.03


def test_rendering_is_deterministic_and_prompts_name_both_objects():
    for relation in RELATIONS:
        for seed in (0, 7):
            one, two = render_relation(relation, seed), render_relation(relation, seed)
            assert (one.image == two.image).all() and one.prompt == two.prompt
            assert one.image.shape == (SIZE, SIZE, 3) and one.image.dtype == np.uint8
            a, b = one.objects
            assert f"{a.phrase} " in one.prompt and f" {relation} " in one.prompt and b.phrase in one.prompt
            assert one.prompt.index(a.phrase) < one.prompt.index(relation) < one.prompt.index(b.phrase)


def test_split_pairs_hold_out_unseen_colour_combinations():
    for relation in RELATIONS:
        train, held = split_pairs(relation, seed=3)
        assert (train, held) == split_pairs(relation, seed=3)
        assert held and not set(train) & set(held) and set(train) | set(held) == set(all_pairs(relation))
        train_combos = {(p[0], p[2]) for p in train}
        assert not any((p[0], p[2]) in train_combos for p in held)  # each held-out pair's colours never met
        for slot in (0, 1, 2, 3):  # ...while every colour and category is still seen in training, in each slot
            assert {p[slot] for p in train} == {p[slot] for p in all_pairs(relation)}
        scenes = [render_relation(relation, seed, pairs=held) for seed in range(10)]
        assert all(s.pair in held for s in scenes)
    with pytest.raises(ValueError):
        render_relation(LEANING_ON, 0, pairs=[("red", "ring", "blue", "box")])
    with pytest.raises(ValueError):
        render_relation(IN_THE_MIDDLE_OF, 0, pairs=[("red", "box", "red", "ball")])


def test_relation_folder_schema_and_bytes(tmp_path):
    seeds = range(100, 112)
    train, _ = split_pairs(LEANING_ON)
    first = write_relation_folder(tmp_path / "one", LEANING_ON, seeds, pairs=train)
    write_relation_folder(tmp_path / "two", LEANING_ON, seeds, pairs=train)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(names) == 1 + 3 * len(seeds)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    data = json.loads((tmp_path / "one" / "relation.json").read_text())
    assert list(data) == ["relation", "template", "mirror", "examples"] and data["mirror"] is True
    assert data["relation"] == LEANING_ON and data["template"] == TEMPLATES[LEANING_ON] == "{a} leaning on {b}"
    for index, (example, scene) in enumerate(zip(data["examples"], first), start=1):
        assert list(example) == ["image", "prompt", "objects"] and example["image"] == f"{index:02d}.png"
        assert example["prompt"] == scene.prompt and scene.pair in train
        image = Image.open(tmp_path / "one" / example["image"])
        assert image.size == (SIZE, SIZE) and (np.asarray(image) == scene.image).all()
        for slot, entry, obj in zip("ab", example["objects"], scene.objects):
            assert list(entry) == ["phrase", "box", "mask", "keypoints"] and entry["phrase"] in example["prompt"]
            assert entry["mask"] == f"{index:02d}_{slot}.png" and len(entry["keypoints"]) == 5
            mask = Image.open(tmp_path / "one" / entry["mask"])
            assert mask.mode == "L" and (np.asarray(mask) == obj.mask * 255).all()
            assert 0 <= entry["box"][0] < entry["box"][2] <= 1 and 0 <= entry["box"][1] < entry["box"][3] <= 1
    write_relation_folder(tmp_path / "bare", IN_THE_MIDDLE_OF, range(3), with_masks=False, with_keypoints=False)
    bare = json.loads((tmp_path / "bare" / "relation.json").read_text())
    assert all(list(o) == ["phrase", "box"] for e in bare["examples"] for o in e["objects"])
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["01.png", "02.png", "03.png", "relation.json"]


def test_relation_folder_reads_back_with_the_trainer_reader(tmp_path):
    from engines.relations.examples import read_examples

    scenes = write_relation_folder(tmp_path, IN_THE_MIDDLE_OF, range(5))
    examples = read_examples(tmp_path)
    assert len(examples.examples) == 5 and examples.relation.template == TEMPLATES[IN_THE_MIDDLE_OF]
    for example, scene in zip(examples.examples, scenes):
        for read, obj in zip(example.objects, scene.objects):
            assert read.phrase == obj.phrase and ((read.mask > 0.5) == obj.mask).all()
            assert np.allclose(read.keypoints, obj.keypoints, atol=1e-4)
