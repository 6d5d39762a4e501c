"""Learned relations on the demo world: does a relation LoRA taught from 12 rendered examples make the demo model draw
a relation it never saw, on object pairs no example showed, without changing who the subjects are?

For each of the demo world's two unseen relations (demo_world/relation_scenes.py: "leaning on" needs a pose change,
"in the middle of" is containment) the bench writes 12 examples from the training colour pairs, teaches two LoRAs —
with DreamRelation's keypoint matching loss and without it — and renders scenes of the held-out colour pairs:
- relation accuracy (demo_world/relation_scorer.py: tilt and contact, or containment, read from the image), as a
  person gets the relation from the picker (its template, its boxes and layers, its LoRA at scale 1), without the
  LoRA, and from the prompt alone (no boxes);
- identity of a registered subject (residual + references, as the reference bench's best mode) in the relation,
  with and without the LoRA: its colour, pattern and pattern colour found by the detector;
- training seconds per LoRA, in the same run.
Scene seeds come from the bench's range (5,000,000) or, with --held-out, from 6,000,000.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from demo_world.detector import detect
from demo_world.relation_scenes import IN_THE_MIDDLE_OF, LEANING_ON, render_relation, split_pairs, write_relation_folder
from demo_world.relation_scorer import score_relation
from demo_world.scenes import COLOURS, ObjectSpec, subject_photos
from engines.service import Studio
from engines.types import (
    PAPER_KEYPOINT_WEIGHT,
    GenerateRequest,
    Layout,
    Region,
    RegisterRequest,
    RelationTrainRequest,
    StepProgress,
)
from evals.common import BenchOptions, ImageCounter

RELATIONS = (LEANING_ON, IN_THE_MIDDLE_OF)
EXAMPLES = 12
# per relation: a registered subject, its slot, and the plain object beside it — a subject big enough to show its
# pattern: the leaning box itself, and the ball that holds a small star
SUBJECTS = {
    LEANING_ON: ("dotty", ObjectSpec("box", "orange", "dotted", "cyan"), "a", "ball"),
    IN_THE_MIDDLE_OF: ("stripy", ObjectSpec("ball", "blue", "striped", "yellow"), "b", "star"),
}
LORAS = {"lora": 0.0, "lora-keypoints": PAPER_KEYPOINT_WEIGHT}  # name → keypoint weight


@dataclass(frozen=True)
class Row:
    title: str
    lora: str | None  # a key of LORAS, or None
    boxes: bool  # the relation's boxes and layers, as the picker proposes them


ROWS = (
    Row("prompt only, no LoRA", None, False),
    Row("relation boxes, no LoRA", None, True),
    Row("relation boxes + LoRA without keypoint loss", "lora", True),
    Row("relation boxes + LoRA with keypoint loss", "lora-keypoints", True),
    Row("prompt only + LoRA with keypoint loss", "lora-keypoints", False),
)


def run_relation_bench(studio: Studio, options: BenchOptions, on_progress: Callable[[StepProgress], None] | None = None,
                       train: RelationTrainRequest | None = None) -> dict:  # fmt: skip
    """The report; `train` overrides the training settings (its name and folder are ignored)."""
    train = train or RelationTrainRequest("bench", "bench")
    count = options.layouts or (8 if options.quick else 30)
    counter = ImageCounter(len(RELATIONS) * (len(ROWS) + 1 + len(LORAS)) * count, on_progress)
    with tempfile.TemporaryDirectory(prefix="troupe-relation-bench-") as work:
        view = studio.with_library(Path(work) / "library")
        registered = [_register_subject(view, Path(work), *SUBJECTS[relation][:2]) for relation in RELATIONS]
        report = {"examples": EXAMPLES, "training_steps": train.steps, "images_per_row": count, "seed": options.seed,
                  "steps": options.steps, "cfg": options.cfg, "subject_registration_seconds": registered,
                  "relations": {}}  # fmt: skip
        for relation in RELATIONS:
            report["relations"][relation] = _bench_relation(view, relation, Path(work), options, count, counter, train)
    return report


def _register_subject(view: Studio, work: Path, name: str, spec: ObjectSpec) -> float:
    paths = []
    for i, scene in enumerate(subject_photos(spec, 3)):
        paths.append(str(work / f"{name}{i}.png"))
        Image.fromarray(scene.image).save(paths[-1])
    began = time.perf_counter()
    view.register(RegisterRequest(name, spec.category, tuple(paths), preset="quick"))
    return round(time.perf_counter() - began, 1)


def _bench_relation(view: Studio, relation: str, work: Path, options: BenchOptions, count: int, counter,
                    train: RelationTrainRequest) -> dict:  # fmt: skip
    train_pairs, held_out = split_pairs(relation)
    folder = work / relation.replace(" ", "-")
    write_relation_folder(folder, relation, range(EXAMPLES), train_pairs, mirror=True)  # both look the same mirrored
    seconds, boxes = {}, None
    for name, weight in LORAS.items():
        began = time.perf_counter()
        request = replace(train, name=f"{relation} {name}", exemplars=str(folder), keypoint_weight=weight)
        info = view.teach_relation(request)
        seconds[name], boxes = round(time.perf_counter() - began, 1), info.boxes
    scenes = [render_relation(relation, options.seed + k, held_out) for k in range(count)]
    rows = {row.title: _accuracy(view, relation, row, scenes, boxes, options, counter) for row in ROWS}
    identity = {lora or "none": _identity(view, relation, lora, boxes, options, count, counter)
                for lora in (None, *LORAS)}  # fmt: skip
    return {"training_seconds": seconds, "held_out_pairs": len(held_out), "rows": rows, "identity": identity}


def _relation_request(relation: str, scene, row: Row, boxes, seed: int, options: BenchOptions) -> GenerateRequest:
    a, b = scene.objects
    layout = Layout((Region(a.phrase, boxes[0], layer=1), Region(b.phrase, boxes[1], layer=0))) if row.boxes else None
    return GenerateRequest(scene.prompt, layout=layout or Layout(), seed=seed, steps=options.steps, cfg=options.cfg,
                           relation=f"{relation} {row.lora}" if row.lora else None)  # fmt: skip


def _accuracy(view: Studio, relation: str, row: Row, scenes, boxes, options, counter) -> dict:
    correct, found, seconds = [], [], []
    for k, scene in enumerate(scenes):
        a, b = scene.objects
        result = view.generate(_relation_request(relation, scene, row, boxes, options.seed + k, options))
        score = score_relation(np.asarray(result.images[0]), relation, a.spec.colour, b.spec.colour)
        correct.append(score.correct)
        found.append(score.found)
        seconds.append(result.timings["total"])
        counter.advance()
    return {"accuracy": statistics.fmean(correct), "found": statistics.fmean(found), "images": len(scenes),
            "seconds_per_image": statistics.fmean(seconds)}  # fmt: skip


def _identity(view: Studio, relation: str, lora: str | None, boxes, options, count: int, counter) -> dict:
    """The subject in its slot of the relation beside a plain object of another colour each time; identity is its
    colour with its pattern in its pattern colour. The detector's category is not asked for: its shape classifier
    misreads a dotted box whose rim the dots cut, or a ball with a star inside, as a ball, ring or star even where the
    picture shows the subject (checked by eye on the demo model, docs/relations.md)."""
    name, spec, slot, companion = SUBJECTS[relation]
    others = [c for c in COLOURS if c not in (spec.colour, spec.colour2)]
    hits = []
    for k in range(count):
        words = f"{others[k % len(others)]} {companion}"
        a, b = (f"<{name}>", f"a {words}") if slot == "a" else (f"a {words}", f"<{name}>")
        regions = [Region(words, box, layer=layer) for box, layer in zip(boxes, (1, 0))]
        regions[0 if slot == "a" else 1] = Region("", boxes[0 if slot == "a" else 1], subject=name,
                                                  layer=1 if slot == "a" else 0)  # fmt: skip
        request = GenerateRequest(f"{a} {relation} {b} on grass", layout=Layout(tuple(regions)), seed=options.seed + k,
                                  steps=options.steps, cfg=options.cfg,
                                  relation=f"{relation} {lora}" if lora else None)  # fmt: skip
        image = np.asarray(view.generate(request).images[0])
        look = (spec.colour, spec.pattern, spec.colour2)  # not the category: see _identity's docstring
        hits.append(any((d.colour, d.pattern, d.colour2) == look for d in detect(image)))
        counter.advance()
    return {"identity": statistics.fmean(hits), "images": count}
