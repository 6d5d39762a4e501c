"""Quality and speed benchmark on the demo world: generate fixed, seeded layouts and score them with the detector.

Layouts come from the demo world's own scene generator (held-out seeds), so every requested box, colour,
category and layer is known exactly. Each layout is generated with no guidance, with the public Cones 2 settings,
with Troupe's default and with Troupe's default plus box fitting, on the same seeds, and scored like MS-CustomNet's
YOLO-L / YOLO-Subj:
- layout IoU: requested box vs the detected box of the object of that colour (0 when missing);
- presence: an object of the requested colour and category was found;
- recognisable presence: the same, counted only over objects that the detector recognises in the exact render of
  the layout's scene (a box with a corner hidden by another object reads as a ball, and a neighbour sharing a
  second colour can merge with it), so an exact render scores 1.0 and the number measures the model, not the scorer;
- colour / category accuracy: the detection that best overlaps the box has the requested colour / category;
- layer order: where two objects' whole shapes overlap, the front object's colour covers more of the overlap than
  the back's (the shapes, not the boxes: a ring's hole or a tent's corners show what is behind them);
- time per image (the modes take turns on each layout, so the times compare the modes in one run).
Two rows are ceilings rather than guidance modes: "ground truth" scores the exact renders of the layouts' scenes (the
scorer's ceiling), "ground truth through the VAE" the same renders encoded and decoded by the model's VAE (what a
model that drew every scene exactly could still show: its decoder blurs small stars' points and boxes' corners).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from demo_world.detector import box_iou, colour_labels, detect
from demo_world.scenes import COLOURS, SIZE, ObjectSpec, Scene, random_scene, shape_mask
from engines.service import Studio
from engines.types import (
    GenerateRequest,
    GuidanceConfig,
    Layout,
    Region,
    StepProgress,
    guidance_mode,
)
from evals.common import BENCH_SEED_OFFSET, HELD_OUT_SEED_OFFSET, BenchOptions, ImageCounter, with_article

MIN_OVERLAP = 0.01  # of the canvas: smaller overlaps say nothing about layer order


@dataclass(frozen=True)
class BenchCase:
    prompt: str
    layout: Layout
    colours: tuple[str, ...]  # per region
    categories: tuple[str, ...]
    seed: int
    recognisable: tuple[bool, ...]  # per region: the detector finds it in the exact render of the scene
    shapes: tuple[ObjectSpec, ...]  # per region: the whole shape the scene drew there, for the layer-order overlap


@dataclass(frozen=True)
class CaseScore:
    objects: int
    ious: tuple[float, ...]
    present: tuple[bool, ...]
    recognisable: tuple[bool, ...]  # the case's, carried along for the recognisable-presence metric
    colour_ok: tuple[bool, ...]
    category_ok: tuple[bool, ...]
    layer_ok: tuple[bool, ...]  # one per overlapping pair
    seconds: float


def bench_cases(count: int, first_seed: int = BENCH_SEED_OFFSET) -> list[BenchCase]:
    """The first `count` scenes from `first_seed` on whose objects all have distinct colours (so colour tells them
    apart)."""
    cases, seed = [], first_seed
    while len(cases) < count:
        scene = random_scene(seed)
        colours = [o.colour for o in scene.objects]
        if len(set(colours)) == len(colours):
            cases.append(case_from_scene(scene, seed))
        seed += 1
    return cases


def case_from_scene(scene: Scene, seed: int) -> BenchCase:
    objects = scene.objects  # back to front
    phrases = [f"{o.colour} {o.category}" for o in objects]
    if scene.relation is not None:
        a, relation, b = scene.relation
        rest = [with_article(phrases[i]) for i in range(len(objects)) if i not in (a, b)]
        words = [f"{with_article(phrases[a])} {relation} {with_article(phrases[b])}"] + rest
    else:
        order = np.random.default_rng(seed).permutation(len(objects))
        words = [with_article(phrases[i]) for i in order]
    prompt = (", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]) + f" on {scene.background}"
    regions = tuple(Region(phrase, o.box, layer=o.layer) for phrase, o in zip(phrases, objects))
    colours, categories = tuple(o.colour for o in objects), tuple(o.category for o in objects)
    detections = detect(scene.image)
    recognisable = tuple(found(detections, colour, category) for colour, category in zip(colours, categories))
    return BenchCase(
        prompt.replace("on night", "at night").replace("on sky", "in the sky"),
        Layout(regions),
        colours,
        categories,
        seed,
        recognisable,
        tuple(o.spec for o in objects),
    )


def found(detections, colour: str, category: str) -> bool:
    return any(d.colour == colour and d.category == category for d in detections)


def score(image, case: BenchCase, seconds: float) -> CaseScore:
    detections = detect(image)
    ious, present, colour_ok, category_ok = [], [], [], []
    for region, colour, category in zip(case.layout.regions, case.colours, case.categories):
        same_colour = [d for d in detections if d.colour == colour]
        ious.append(max((box_iou(region.box, d.box) for d in same_colour), default=0.0))
        present.append(found(same_colour, colour, category))
        overlapping = [(box_iou(region.box, d.box), d) for d in detections]
        best = max(overlapping, key=lambda pair: pair[0], default=(0.0, None))
        colour_ok.append(best[0] > 0 and best[1].colour == colour)
        category_ok.append(best[0] > 0 and best[1].category == category)
    return CaseScore(
        len(case.colours),
        tuple(ious),
        tuple(present),
        case.recognisable,
        tuple(colour_ok),
        tuple(category_ok),
        layer_order(image, case),
        seconds,
    )


def layer_order(image, case: BenchCase) -> tuple[bool, ...]:
    """For each pair of regions whose objects' whole shapes overlap: does the front one's colour win the overlap?"""
    labels, _ = colour_labels(image)  # (H, W) colour index or -1
    height, width = labels.shape
    labels = labels[(np.arange(SIZE) * height) // SIZE][:, (np.arange(SIZE) * width) // SIZE]  # on the scenes' canvas
    names = list(COLOURS)
    shapes = [shape_mask(s.category, s.cx, s.cy, s.size) for s in case.shapes]  # (SIZE, SIZE) bool each
    results = []
    regions = case.layout.regions
    for i in range(len(regions)):
        for j in range(i + 1, len(regions)):
            overlap = shapes[i] & shapes[j]  # (H, W)
            if overlap.mean() < MIN_OVERLAP or regions[i].layer == regions[j].layer:
                continue
            front, back = (i, j) if regions[i].layer > regions[j].layer else (j, i)
            front_pixels = (labels[overlap] == names.index(case.colours[front])).sum()
            back_pixels = (labels[overlap] == names.index(case.colours[back])).sum()
            results.append(bool(front_pixels > back_pixels))
    return tuple(results)


def run_bench(studio: Studio, options: BenchOptions, on_progress: Callable[[StepProgress], None] | None = None) -> dict:
    """Generate every case under every guidance mode; a JSON-able report with per-group metrics."""
    cases = bench_cases(options.count, options.seed)
    info = studio.model_info()
    names = {BENCH_SEED_OFFSET: "bench", HELD_OUT_SEED_OFFSET: "held-out"}
    report = {
        "model": info["source"],
        "family": info["family"],
        "steps": options.steps,
        "cfg": options.cfg,
        "layouts": names.get(options.seed, f"from seed {options.seed}"),
        "cases": len(cases),
        "modes": {},
    }
    # The scorer's ceiling: the scenes the layouts came from, rendered exactly (occlusion hides some shapes).
    report["modes"]["ground truth"] = summarise([score(random_scene(c.seed).image, c, 0.0) for c in cases])
    if options.modes:  # the model's ceiling: its VAE blurs small stars' points and boxes' corners
        report["modes"]["ground truth through the VAE"] = summarise(
            [score(studio.vae_roundtrip(random_scene(c.seed).image), c, 0.0) for c in cases]
        )
    progress = ImageCounter(len(cases) * len(options.modes), on_progress)
    scores: dict[str, list[CaseScore]] = {mode: [] for mode in options.modes}
    for case in cases:  # modes take turns on each layout, so warm-up and load drift fall on every mode alike
        for mode in options.modes:
            scores[mode] += score_guidance(studio, [case], guidance_mode(mode).config, options, progress)
    report["modes"].update((mode, summarise(mode_scores)) for mode, mode_scores in scores.items())
    return report


def score_guidance(
    studio: Studio,
    cases: Sequence[BenchCase],
    guidance: GuidanceConfig,
    options: BenchOptions,
    progress: ImageCounter | None = None,
) -> list[CaseScore]:
    """Generate every case with `guidance` and score it."""
    scores = []
    for case in cases:
        request = GenerateRequest(
            case.prompt, layout=case.layout, seed=case.seed, steps=options.steps, cfg=options.cfg, guidance=guidance
        )
        result = studio.generate(request)
        scores.append(score(np.asarray(result.images[0]), case, result.timings["total"]))
        if progress is not None:
            progress.advance()
    return scores


def summarise(scores: Sequence[CaseScore]) -> dict:
    groups = {
        "1-2 objects": [s for s in scores if s.objects <= 2],
        "3-4 objects": [s for s in scores if s.objects > 2],
        "all": list(scores),
    }
    return {name: _metrics(group) for name, group in groups.items() if group}


def _metrics(scores: Sequence[CaseScore]) -> dict:
    def mean(values) -> float | None:
        values = [float(v) for v in values]
        return round(statistics.fmean(values), 3) if values else None

    return {
        "layouts": len(scores),
        "layout_iou": mean(v for s in scores for v in s.ious),
        "presence": mean(v for s in scores for v in s.present),
        "recognisable_presence": mean(v for s in scores for v, ok in zip(s.present, s.recognisable) if ok),
        "recognisable_objects": f"{sum(sum(s.recognisable) for s in scores)}/{sum(s.objects for s in scores)}",
        "colour_accuracy": mean(v for s in scores for v in s.colour_ok),
        "category_accuracy": mean(v for s in scores for v in s.category_ok),
        "layer_order_accuracy": mean(v for s in scores for v in s.layer_ok),
        "overlapping_pairs": sum(len(s.layer_ok) for s in scores),
        "seconds_per_image": mean(s.seconds for s in scores),
    }
