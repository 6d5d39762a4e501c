"""Subject identity on the demo world: does a subject registered from 5 photos keep its look in new compositions?

Each bench subject is a patterned object ("a blue ball with yellow stripes") that the plain class word does not
produce by itself. It is registered from 5 demo photos (engines/register/, Cones 2 Eq. 3-5), then composed next
to another object in seeded layouts with Troupe's default guidance. Scored by the detector in the subject's box:
- subject IoU / presence: a detection of the subject's colour and category, as in the layout bench;
- identity: that detection also shows the subject's pattern in its second colour (pattern and colour match
  against the photos).
The same layouts with the class word in place of the subject ("a ball next to ...") are the baseline: their
identity score is how often the model draws the subject's look by chance.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from demo_world.detector import box_iou, detect
from demo_world.scenes import BACKGROUNDS, CATEGORIES, COLOURS, ObjectSpec, subject_photos
from engines.service import Studio
from engines.types import GenerateRequest, Layout, Region, RegisterRequest, StepProgress
from evals.common import BenchOptions, ImageCounter, with_article

BENCH_SUBJECTS: tuple[tuple[str, ObjectSpec], ...] = (
    ("stripy", ObjectSpec("ball", "blue", "striped", "yellow")),
    ("dotty", ObjectSpec("box", "orange", "dotted", "cyan")),
)
PHOTOS_PER_SUBJECT = 5
BACKGROUND_WORDS = {"grass": "on grass", "sky": "in the sky", "sand": "on sand", "night": "at night"}


@dataclass(frozen=True)
class Composition:
    subject: str
    spec: ObjectSpec
    layout: Layout  # region 0 is the subject
    companion: str  # e.g. "purple tent"
    background: str
    seed: int

    def prompt(self, subject_words: str) -> str:
        """e.g. "a <stripy> next to an orange ring on grass" (subject_words "<stripy>" or "ball")."""
        return (
            f"{with_article(subject_words)} next to {with_article(self.companion)} {BACKGROUND_WORDS[self.background]}"
        )


def compositions(name: str, spec: ObjectSpec, count: int, seed: int = 0) -> list[Composition]:
    """Seeded side-by-side layouts: the subject in one half, another object of an unrelated colour in the other."""
    rng = np.random.default_rng([seed, 4242])
    colours = [c for c in COLOURS if c not in (spec.colour, spec.colour2)]
    categories = [c for c in CATEGORIES if c != spec.category]
    out = []
    for i in range(count):
        size = float(rng.uniform(0.36, 0.46))
        left = (float(rng.uniform(0.04, 0.5 - size)), float(rng.uniform(0.1, 0.9 - size)))
        right = (float(rng.uniform(0.5, 0.96 - size)), float(rng.uniform(0.1, 0.9 - size)))
        subject_at, companion_at = (left, right) if i % 2 == 0 else (right, left)
        companion = f"{colours[rng.integers(len(colours))]} {categories[rng.integers(len(categories))]}"
        regions = (Region("", _box(subject_at, size), subject=name), Region(companion, _box(companion_at, size)))
        out.append(
            Composition(
                name,
                spec,
                Layout(regions),
                companion,
                list(BACKGROUNDS)[i % len(BACKGROUNDS)],
                seed=7_000_000 + 100 * i + int(rng.integers(100)),
            )
        )
    return out


def _box(corner: tuple[float, float], size: float) -> tuple[float, float, float, float]:
    return (corner[0], corner[1], corner[0] + size, corner[1] + size)


@dataclass(frozen=True)
class IdentityScore:
    iou: float
    present: bool  # the subject's colour and category
    identity: bool  # ... and its pattern in its second colour
    seconds: float


def score_identity(image, composition: Composition, seconds: float) -> IdentityScore:
    spec, box = composition.spec, composition.layout.regions[0].box
    candidates = [d for d in detect(image) if d.colour == spec.colour and d.category == spec.category]
    best = max(candidates, key=lambda d: box_iou(box, d.box), default=None)
    if best is None:
        return IdentityScore(0.0, False, False, seconds)
    looks_right = best.pattern == spec.pattern and best.colour2 == spec.colour2
    return IdentityScore(box_iou(box, best.box), True, looks_right, seconds)


def run_subject_bench(
    studio: Studio,
    options: BenchOptions,
    preset: str = "quick",
    on_progress: Callable[[StepProgress], None] | None = None,
) -> dict:
    """Register each bench subject in a temporary library, compose it with and without its Δ; a JSON-able report."""
    subjects = BENCH_SUBJECTS[:1] if options.quick else BENCH_SUBJECTS
    per_subject = 4 if options.quick else 12
    rows: dict[str, list[IdentityScore]] = {"registered subject": [], "class word only": []}
    registration_seconds = []
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as folder:
        view = studio.with_library(Path(folder) / "library")
        counter = ImageCounter(len(subjects) * per_subject * 2, on_progress)
        for name, spec in subjects:
            began = time.perf_counter()
            photos = write_subject_photos(spec, Path(folder) / name)
            view.register(RegisterRequest(name, spec.category, photos, preset=preset))
            registration_seconds.append(time.perf_counter() - began)
            for composition in compositions(name, spec, per_subject):
                for row, (prompt, layout) in prompt_variants(composition).items():
                    request = GenerateRequest(
                        prompt, layout=layout, seed=composition.seed, steps=options.steps, cfg=options.cfg
                    )
                    result = view.generate(request)
                    rows[row].append(score_identity(np.asarray(result.images[0]), composition, result.timings["total"]))
                    counter.advance()
    return {
        "preset": preset,
        "photos": PHOTOS_PER_SUBJECT,
        "subjects": [n for n, _ in subjects],
        "registration_seconds": round(statistics.fmean(registration_seconds), 1),
        "rows": {row: _identity_metrics(scores) for row, scores in rows.items()},
    }


def prompt_variants(composition: Composition) -> dict[str, tuple[str, Layout]]:
    """The composition's prompt and layout naming the registered subject, and naming only its class word."""
    subject_region, *rest = composition.layout.regions
    class_region = Region(composition.spec.category, subject_region.box)
    return {
        "registered subject": (composition.prompt(f"<{composition.subject}>"), composition.layout),
        "class word only": (composition.prompt(composition.spec.category), Layout((class_region, *rest))),
    }


def write_subject_photos(spec: ObjectSpec, folder: Path) -> tuple[str, ...]:
    folder.mkdir(parents=True)
    paths = []
    for i, scene in enumerate(subject_photos(spec, PHOTOS_PER_SUBJECT)):
        paths.append(str(folder / f"photo{i}.png"))
        Image.fromarray(scene.image).save(paths[-1])
    return tuple(paths)


def _identity_metrics(scores: list[IdentityScore]) -> dict:
    return {
        "compositions": len(scores),
        "subject_iou": round(statistics.fmean(s.iou for s in scores), 3),
        "presence": round(statistics.fmean(s.present for s in scores), 3),
        "identity": round(statistics.fmean(s.identity for s in scores), 3),
        "seconds_per_image": round(statistics.fmean(s.seconds for s in scores), 3),
    }
