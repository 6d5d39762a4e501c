"""Reference identity on the demo world: do a subject's photos give it its look, alone and beside other subjects?

Four ways a subject reaches a picture (MODES), each from 1 and from 3 photos, in two kinds of composition: one
subject beside an unrelated object (subject_bench's layouts), and three subjects side by side in one picture.
Scored by the demo detector in each region's box:
- identity: the subject's colour and category, with its pattern in its second colour;
- confusion: a region whose object wears another subject's colour, or its pattern in that subject's second colour
  (DreamRelation's "object confusion"); the companion object counts as a region too;
- subject IoU / presence: as in subject_bench, against the same layouts in every mode;
- seconds per image and UNet calls per denoising step (counted on the UNet itself).
The bench's subjects are the demo dataset's held-out looks (demo_world/reference_scenes.py): the adapter never saw
them. Layouts and seeds come from the bench's seed range (5,000,000) or, with --held-out, from 6,000,000.
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

from demo_world.detector import box_iou, detect
from demo_world.scenes import BACKGROUNDS, ObjectSpec, subject_photos
from engines.references import attach_pending_adapter
from engines.service import Studio
from engines.types import GenerateRequest, Layout, ReferenceConfig, Region, RegisterRequest, StepProgress
from evals.common import BenchOptions, ImageCounter
from evals.subject_bench import BACKGROUND_WORDS, BENCH_SUBJECTS, Composition, compositions

SUBJECTS: tuple[tuple[str, ObjectSpec], ...] = (
    *BENCH_SUBJECTS,
    ("tenty", ObjectSpec("tent", "cyan", "striped", "red")),
)
PHOTO_COUNTS = (1, 3)
MIN_REGION_IOU = 0.1  # a detection overlapping a region less than this is not that region's object


@dataclass(frozen=True)
class Mode:
    title: str
    preset: str  # how the subjects are registered: "quick" trains a residual, "instant" trains nothing
    references: bool
    adapter: bool


MODES: dict[str, Mode] = {
    "residual": Mode("residual only (quick)", "quick", references=False, adapter=False),
    "references": Mode("references only (instant)", "instant", references=True, adapter=False),
    "references+adapter": Mode("references + adapter (instant)", "instant", references=True, adapter=True),
    "both": Mode("residual + references + adapter (quick)", "quick", references=True, adapter=True),
}


@dataclass(frozen=True)
class Scene:
    """One picture to generate: its prompt, its regions and which subject each one is (None: a plain object)."""

    prompt: str
    layout: Layout
    looks: tuple[ObjectSpec, ...]  # what each region should show
    subjects: tuple[str | None, ...]
    seed: int


@dataclass(frozen=True)
class ImageScore:
    identity: tuple[bool, ...]  # per subject region
    present: tuple[bool, ...]
    iou: tuple[float, ...]
    confused: tuple[bool, ...]  # per region, subjects and others
    seconds: float
    unet_calls_per_step: float


def single_scenes(count: int, seed: int) -> list[Scene]:
    """Each bench subject beside an unrelated object (subject_bench's layouts), `count` per subject."""
    scenes = []
    for name, spec in BENCH_SUBJECTS:
        for composition in compositions(name, spec, count, seed):
            scenes.append(_single(composition, seed + 10_000 + len(scenes)))
    return scenes


def _single(composition: Composition, seed: int) -> Scene:
    colour, category = composition.companion.split()
    return Scene(
        composition.prompt(f"<{composition.subject}>"),
        composition.layout,
        (composition.spec, ObjectSpec(category, colour)),
        (composition.subject, None),
        seed,
    )


def trio_scenes(count: int, seed: int) -> list[Scene]:
    """The three subjects side by side in shuffled order, one per third of the canvas, seeded."""
    rng = np.random.default_rng([seed, 31337])
    scenes = []
    for i in range(count):
        order = [SUBJECTS[j] for j in rng.permutation(len(SUBJECTS))]
        regions = []
        for column, (name, _) in enumerate(order):
            size = float(rng.uniform(0.26, 0.32))
            x0 = column / 3 + float(rng.uniform(0.005, 1 / 3 - size - 0.005))
            y0 = float(rng.uniform(0.15, 0.85 - size))
            regions.append(Region("", (x0, y0, x0 + size, y0 + size), subject=name))
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        prompt = f"a <{order[0][0]}>, a <{order[1][0]}> and a <{order[2][0]}> {BACKGROUND_WORDS[background]}"
        looks, names = tuple(s for _, s in order), tuple(n for n, _ in order)
        scenes.append(Scene(prompt, Layout(tuple(regions)), looks, names, seed + 20_000 + 100 * i))
    return scenes


def score_scene(image, scene: Scene, seconds: float, calls_per_step: float) -> ImageScore:
    detections = detect(image)
    subject_looks = [look for look, name in zip(scene.looks, scene.subjects) if name is not None]
    identity, present, iou, confused = [], [], [], []
    for region, look, name in zip(scene.layout.regions, scene.looks, scene.subjects):
        found = _in_region(detections, region.box)
        confused.append(found is not None and _wears_another_look(found, look, subject_looks))
        if name is None:
            continue
        matches = [d for d in detections if d.colour == look.colour and d.category == look.category]
        best = max(matches, key=lambda d: box_iou(region.box, d.box), default=None)
        present.append(best is not None)
        iou.append(0.0 if best is None else box_iou(region.box, best.box))
        identity.append(best is not None and (best.pattern, best.colour2) == (look.pattern, look.colour2))
    return ImageScore(tuple(identity), tuple(present), tuple(iou), tuple(confused), seconds, calls_per_step)


def _in_region(detections, box):
    best = max(detections, key=lambda d: box_iou(box, d.box), default=None)
    return best if best is not None and box_iou(box, best.box) >= MIN_REGION_IOU else None


def _wears_another_look(found, own: ObjectSpec, subject_looks: list[ObjectSpec]) -> bool:
    """Another subject's colour as this object's colour, or its pattern in its second colour on this object."""
    for other in subject_looks:
        if other == own:
            continue
        if found.colour == other.colour != own.colour:
            return True
        pattern = (found.pattern, found.colour2)
        if other.pattern != "plain" and pattern == (other.pattern, other.colour2) != (own.pattern, own.colour2):
            return True
    return False


class UNetCalls:
    """Counts the UNet's forward calls (the reference pass is one more per step)."""

    def __init__(self, unet) -> None:
        self.count = 0
        self.hook = unet.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.count += 1

    def close(self) -> None:
        self.hook.remove()


def run_reference_bench(studio: Studio, options: BenchOptions, base: ReferenceConfig | None = None,
                        on_progress: Callable[[StepProgress], None] | None = None,
                        modes: tuple[str, ...] = tuple(MODES),
                        photo_counts: tuple[int, ...] = PHOTO_COUNTS) -> dict:  # fmt: skip
    """Every mode × photo count × composition kind on the same scenes; a JSON-able report."""
    base, per_kind = base or ReferenceConfig(), 2 if options.quick else 12
    kinds = {
        "1 subject": single_scenes(per_kind // 2, options.seed),
        "3 subjects": trio_scenes(per_kind, options.seed),
    }
    counter = ImageCounter(len(modes) * len(photo_counts) * sum(map(len, kinds.values())), on_progress)
    rows: dict[str, dict] = {}
    calls = UNetCalls(studio.bundle.pipe.unet)
    try:
        with tempfile.TemporaryDirectory(prefix="troupe-refbench-") as folder:
            for photos in photo_counts:
                for preset in dict.fromkeys(MODES[m].preset for m in modes):
                    view, seconds = _registered(studio, Path(folder) / f"{preset}-{photos}", preset, photos)
                    for mode in (m for m in modes if MODES[m].preset == preset):
                        config = replace(base, enabled=MODES[mode].references, adapter=MODES[mode].adapter)
                        scores = {kind: _generate_all(view, scenes, options, config, calls, counter)
                                  for kind, scenes in kinds.items()}  # fmt: skip
                        rows.setdefault(mode, {})[f"{photos} photo" + "s" * (photos > 1)] = {
                            kind: {**_metrics(s), "registration_seconds": seconds} for kind, s in scores.items()
                        }
    finally:
        calls.close()
    return {
        "subjects": [n for n, _ in SUBJECTS],
        "adapter": attach_pending_adapter(studio.bundle),
        "settings": {k: v for k, v in base.__dict__.items() if k not in ("enabled", "adapter")},
        "modes": {mode: MODES[mode].title for mode in modes},
        "rows": rows,
    }


def _registered(studio: Studio, folder: Path, preset: str, photos: int) -> tuple[Studio, float]:
    """A library with the three subjects registered from their first `photos` demo photos; mean seconds each."""
    folder.mkdir(parents=True)
    view, took = studio.with_library(folder / "library"), []
    for name, spec in SUBJECTS:
        paths = []
        for i, scene in enumerate(subject_photos(spec, photos)):
            paths.append(str(folder / f"{name}{i}.png"))
            Image.fromarray(scene.image).save(paths[-1])
        began = time.perf_counter()
        view.register(RegisterRequest(name, spec.category, tuple(paths), preset=preset))
        took.append(time.perf_counter() - began)
    return view, round(statistics.fmean(took), 2)


def _generate_all(view: Studio, scenes: list[Scene], options: BenchOptions, config: ReferenceConfig,
                  calls: UNetCalls, counter: ImageCounter) -> list[ImageScore]:  # fmt: skip
    scores = []
    for scene in scenes:
        request = GenerateRequest(scene.prompt, layout=scene.layout, seed=scene.seed, steps=options.steps,
                                  cfg=options.cfg, references=config)  # fmt: skip
        before = calls.count
        result = view.generate(request)
        per_step = (calls.count - before) / options.steps
        scores.append(score_scene(np.asarray(result.images[0]), scene, result.timings["total"], per_step))
        counter.advance()
    return scores


def _metrics(scores: list[ImageScore]) -> dict:
    def mean(values) -> float:
        values = [float(v) for s in scores for v in values(s)]
        return round(statistics.fmean(values), 3) if values else 0.0

    return {
        "compositions": len(scores),
        "identity": mean(lambda s: s.identity),
        "confusion": mean(lambda s: s.confused),
        "subject_iou": mean(lambda s: s.iou),
        "presence": mean(lambda s: s.present),
        "seconds_per_image": mean(lambda s: (s.seconds,)),
        "unet_calls_per_step": mean(lambda s: (s.unet_calls_per_step,)),
    }
