"""Procedural scenes of the demo world (64x64 RGB), fully deterministic from a seed.

The world: flat backgrounds with mild noise, 1-4 simple objects (ball, box, tent, star, ring) in six colours,
plain or patterned (stripes / dots of a second colour), drawn back to front so later objects occlude earlier
ones. Every scene knows each object's box (x0, y0, x1, y1) in [0, 1] of the canvas, its visible pixel mask
(after occlusion) and its layer (0 = back). Names and colours are an interface: other tools rely on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SIZE = 64  # canvas side in pixels (the demo model's native size)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grass": (110, 170, 90),
    "sky": (150, 200, 245),
    "sand": (225, 205, 150),
    "night": (35, 35, 70),
}
CATEGORIES: tuple[str, ...] = ("ball", "box", "tent", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 70, 210),
    "yellow": (245, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
    "cyan": (40, 200, 200),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
RELATIONS: tuple[str, ...] = ("on top of", "next to", "in front of", "inside")
MIN_SIZE, MAX_SIZE = 14, 40
BACKGROUND_NOISE_STD = 3.0  # "mild noise" on the background only; objects are flat
STAR_INNER_RATIO = 0.45  # inner/outer radius of the five-pointed star (fill of its box ~0.38)
RING_INNER_RATIO = 0.5  # hole radius / outer radius of the ring
STRIPE_PERIOD, STRIPE_WIDTH = 8, 3  # diagonal stripes (second colour 3 of every 8 px), anchored at the centre
DOT_PERIOD, DOT_RADIUS = 8, 2.0  # square grid of dots, anchored at the object's centre

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass"),
    "sky": ("in the sky", "against the sky"),
    "sand": ("on sand", "on the sand", "on the beach"),
    "night": ("at night", "in the night"),
}

# pixel-centre coordinates, shared by every drawing call
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # [64, 64] each


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: category, colours, pattern, centre (pixels) and size (pixels, the side of its square)."""

    category: str
    colour: str
    pattern: str = "plain"
    colour2: str | None = None  # the pattern's second colour; None for plain
    cx: float = 32.0
    cy: float = 32.0
    size: float = 24.0

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.pattern != "plain" and (self.colour2 not in COLOURS or self.colour2 == self.colour):
            raise ValueError(f"pattern {self.pattern!r} needs a second colour different from {self.colour!r}")


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    pattern: str
    colour2: str | None
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the whole (unoccluded) shape
    mask: np.ndarray  # [64, 64] bool, the pixels visible after occlusion
    layer: int  # 0 = back
    spec: ObjectSpec

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.category}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [64, 64, 3] uint8 RGB
    caption: str
    background: str
    objects: tuple[SceneObject, ...]  # in layer order, back to front
    relation: tuple[int, str, int] | None = None  # (layer of A, relation, layer of B): "A <relation> B"
    phrase_spans: tuple[tuple[int, int], ...] = ()  # each object's words in `caption`: (start, end) characters


# ----------------------------------------------------------------------------------------------- shapes


def shape_mask(category: str, cx: float, cy: float, size: float) -> np.ndarray:
    """[64, 64] bool mask of the whole shape centred at (cx, cy) with its square side `size` (pixels)."""
    r = size / 2.0
    dx, dy = _XX - cx, _YY - cy  # [64, 64]
    if category == "ball":
        return dx * dx + dy * dy <= r * r
    if category == "box":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if category == "tent":  # apex at the top centre, base along the bottom edge
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
    if category == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (RING_INNER_RATIO * r) ** 2)
    if category == "star":
        # polar coordinates around the centre, angle measured clockwise from "up"
        rho = np.sqrt(dx * dx + dy * dy)
        theta = np.degrees(np.arctan2(dx, -dy)) % 72.0  # [0, 72): one point every 72 degrees
        b = np.radians(np.minimum(theta, 72.0 - theta))  # angle to the nearest outer vertex, [0, 36] deg
        ri, s36, c36 = STAR_INNER_RATIO * r, np.sin(np.radians(36.0)), np.cos(np.radians(36.0))
        # the edge from the outer vertex (r, 0) to the inner vertex (ri, 36 deg), hit by the ray at angle b
        edge = r * ri * s36 / (ri * s36 * np.cos(b) + (r - ri * c36) * np.sin(b))
        return rho <= edge
    raise ValueError(f"unknown category {category!r}")


def pattern_mask(pattern: str, cx: float, cy: float) -> np.ndarray:
    """[64, 64] bool: pixels that take the second colour, anchored at the object's centre."""
    if pattern == "plain":
        return np.zeros((SIZE, SIZE), dtype=bool)
    dx, dy = _XX - cx, _YY - cy
    if pattern == "striped":
        return np.mod((dx + dy) / np.sqrt(2.0), STRIPE_PERIOD) < STRIPE_WIDTH
    if pattern == "dotted":
        gx = dx - np.round(dx / DOT_PERIOD) * DOT_PERIOD
        gy = dy - np.round(dy / DOT_PERIOD) * DOT_PERIOD
        return gx * gx + gy * gy <= DOT_RADIUS * DOT_RADIUS
    raise ValueError(f"unknown pattern {pattern!r}")


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()) / SIZE, float(ys.min()) / SIZE, float(xs.max() + 1) / SIZE, float(ys.max() + 1) / SIZE)


# ---------------------------------------------------------------------------------------------- render


def render_scene(
    specs: Sequence[ObjectSpec],
    background: str = "grass",
    seed: int = 0,
    caption: str | None = None,
    relation: tuple[int, str, int] | None = None,
    noise: bool = True,
) -> Scene:
    """Draw `specs` back to front (specs[0] is the back) on `background`. Used for training scenes and for
    "subject photos" (the same patterned object on various backgrounds and positions)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    rng = np.random.default_rng(seed)
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[background]
    if noise:
        img += rng.normal(0.0, BACKGROUND_NOISE_STD, size=img.shape).astype(np.float32)
    full_masks = []
    for spec in specs:
        m = shape_mask(spec.category, spec.cx, spec.cy, spec.size)  # [64, 64]
        img[m] = COLOURS[spec.colour]
        if spec.pattern != "plain":
            p = m & pattern_mask(spec.pattern, spec.cx, spec.cy)
            img[p] = COLOURS[spec.colour2]
        full_masks.append(m)
    covered = np.zeros((SIZE, SIZE), dtype=bool)
    visible = [None] * len(specs)
    for i in range(len(specs) - 1, -1, -1):  # front to back: what later objects cover is not visible
        visible[i] = full_masks[i] & ~covered
        covered |= full_masks[i]
    objects = tuple(
        SceneObject(s.category, s.colour, s.pattern, s.colour2, _mask_box(full_masks[i]), visible[i], i, s)
        for i, s in enumerate(specs)
    )
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    spans: tuple[tuple[int, int], ...] = ()
    if caption is None:
        caption, spans = describe(objects, background, rng, relation)
    return Scene(image, caption, background, objects, relation, spans)


# --------------------------------------------------------------------------------------------- captions


def object_phrase(obj: SceneObject | ObjectSpec, rng: np.random.Generator, article: bool = True) -> str:
    u = rng.random()
    if obj.pattern != "plain" and u < 0.75:
        what = "stripes" if obj.pattern == "striped" else "dots"
        words = f"{obj.colour} {obj.category} with {obj.colour2} {what}"
    elif u < 0.88:
        words = f"{obj.colour} {obj.category}"
    else:
        words = obj.category
    if not article:
        return words
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(
    objects: Sequence[SceneObject],
    background: str,
    rng: np.random.Generator,
    relation: tuple[int, str, int] | None = None,
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """A caption from templates, and each object's (start, end) characters in it (in layer order).

    Object order varies so the model learns words, not positions. The spans let the trainer tie each object's
    words to its pixels (the grounding loss)."""
    order = list(rng.permutation(len(objects)))
    parts: list[list[tuple[int, str]]] = []  # each part: (object index, phrase) pieces joined by relation words
    if relation is not None:
        a, rel, b = relation
        parts.append([(a, object_phrase(objects[a], rng)), (-1, rel), (b, object_phrase(objects[b], rng))])
        order = [i for i in order if i not in (a, b)]
        if rng.random() < 0.5:
            parts = parts + [[(i, object_phrase(objects[i], rng))] for i in order]
        else:
            parts = [[(i, object_phrase(objects[i], rng))] for i in order] + parts
    else:
        parts = [[(i, object_phrase(objects[i], rng))] for i in order]
    text, spans = "", [(0, 0)] * len(objects)
    for k, part in enumerate(parts):
        text += "" if k == 0 else (" and " if k == len(parts) - 1 else ", ")
        for j, (index, words) in enumerate(part):
            text += "" if j == 0 else " "
            if index >= 0:
                spans[index] = (len(text), len(text) + len(words))
            text += words
    if rng.random() < 0.7:
        phrases = BACKGROUND_PHRASES[background]
        text += " " + phrases[rng.integers(len(phrases))]
    if rng.random() < 0.1:
        text = "a photo of " + text
        spans = [(start + 11, end + 11) for start, end in spans]
    return text, tuple(spans)


# ------------------------------------------------------------------------------------------ random scenes


def _random_look(rng: np.random.Generator, category: str) -> dict:
    colours = list(COLOURS)
    colour = colours[rng.integers(len(colours))]
    u = rng.random()
    pattern = "plain" if u < 0.6 else ("striped" if u < 0.8 else "dotted")
    colour2 = None
    if pattern != "plain":
        others = [c for c in colours if c != colour]
        colour2 = others[rng.integers(len(others))]
    return dict(category=category, colour=colour, pattern=pattern, colour2=colour2)


def _random_category(rng: np.random.Generator) -> str:
    return CATEGORIES[rng.integers(len(CATEGORIES))]


def _place(rng: np.random.Generator, size: float) -> tuple[float, float]:
    lo, hi = size / 2.0, SIZE - size / 2.0
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _relation_pair(rng: np.random.Generator, rel: str) -> tuple[list[ObjectSpec], tuple[int, str, int]]:
    """Two objects A (returned second, in front) and B in relation "A rel B"; returns back-to-front specs."""
    if rel == "inside":  # a ball inside a ring
        rs = float(rng.uniform(32, MAX_SIZE))
        bs = float(rng.uniform(MIN_SIZE, RING_INNER_RATIO * rs * 0.95))
        cx, cy = _place(rng, rs)
        ring = ObjectSpec(cx=cx, cy=cy, size=rs, **_random_look(rng, "ring"))
        ball = ObjectSpec(cx=cx, cy=cy, size=bs, **_random_look(rng, "ball"))
        return [ring, ball], (1, rel, 0)
    sa, sb = float(rng.uniform(MIN_SIZE, 30)), float(rng.uniform(MIN_SIZE, 30))
    la, lb = _random_look(rng, _random_category(rng)), _random_look(rng, _random_category(rng))
    if rel == "on top of":  # A rests on B's top edge, roughly centred
        cx = float(rng.uniform(max(sa, sb) / 2, SIZE - max(sa, sb) / 2))
        top_b = float(rng.uniform(sa, SIZE - sb))  # y of B's top edge
        b = ObjectSpec(cx=cx + float(rng.uniform(-2, 2)), cy=top_b + sb / 2, size=sb, **lb)
        a = ObjectSpec(cx=cx + float(rng.uniform(-3, 3)), cy=top_b - sa / 2, size=sa, **la)
        return [b, a], (1, rel, 0)
    if rel == "next to":  # side by side on a common baseline, small gap
        gap = float(rng.uniform(1, 6))
        sb = min(sb, SIZE - sa - gap - 1.0)  # both must fit side by side
        width = sa + sb + gap
        x0 = float(rng.uniform(0, SIZE - width))
        base = float(rng.uniform(max(sa, sb), SIZE))
        left_a = rng.random() < 0.5
        if left_a:
            ca, cb = x0 + sa / 2, x0 + sa + gap + sb / 2
        else:
            ca, cb = x0 + sb + gap + sa / 2, x0 + sb / 2
        a = ObjectSpec(cx=ca, cy=base - sa / 2, size=sa, **la)
        b = ObjectSpec(cx=cb, cy=base - sb / 2, size=sb, **lb)
        return [b, a], (1, rel, 0)
    if rel == "in front of":  # A overlaps B, lower and in front
        sb = float(rng.uniform(20, MAX_SIZE))
        bx, by = _place(rng, sb)
        ax = float(np.clip(bx + rng.uniform(-0.6, 0.6) * sb, sa / 2, SIZE - sa / 2))
        ay = float(np.clip(by + rng.uniform(0.1, 0.5) * sb, sa / 2, SIZE - sa / 2))
        b = ObjectSpec(cx=bx, cy=by, size=sb, **lb)
        a = ObjectSpec(cx=ax, cy=ay, size=sa, **la)
        return [b, a], (1, rel, 0)
    raise ValueError(f"unknown relation {rel!r}")


def random_scene(seed: int) -> Scene:
    """The training / test distribution: a scene fully determined by `seed`."""
    rng = np.random.default_rng([seed, 20260611])
    backgrounds = list(BACKGROUNDS)
    background = backgrounds[rng.integers(len(backgrounds))]
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
    relation = None
    if n >= 2 and rng.random() < 0.45:
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        specs, relation = _relation_pair(rng, rel)
        # extra objects go behind the pair, so the relation stays readable
        extra = []
        for _ in range(n - 2):
            s = float(rng.uniform(MIN_SIZE, 26))
            cx, cy = _place(rng, s)
            extra.append(ObjectSpec(cx=cx, cy=cy, size=s, **_random_look(rng, _random_category(rng))))
        specs = extra + specs
        relation = (relation[0] + len(extra), relation[1], relation[2] + len(extra))
    else:
        specs = []
        for _ in range(n):
            s = float(rng.uniform(MIN_SIZE, MAX_SIZE if n <= 2 else 30))
            cx, cy = _place(rng, s)
            specs.append(ObjectSpec(cx=cx, cy=cy, size=s, **_random_look(rng, _random_category(rng))))
    return render_scene(specs, background, seed=int(rng.integers(2**31)), relation=relation)


def scene_batch(seeds: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Images [N, 64, 64, 3] uint8 and captions of `random_scene(seed)` for each seed."""
    scenes = [random_scene(int(s)) for s in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def subject_photos(spec: ObjectSpec, n: int, seed: int = 0) -> list[Scene]:
    """The same (patterned) object alone on various backgrounds, positions and sizes: "photos of a subject"."""
    rng = np.random.default_rng([seed, 77])
    out = []
    for _ in range(n):
        size = float(rng.uniform(24, MAX_SIZE))
        cx, cy = _place(rng, size)
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        s = ObjectSpec(spec.category, spec.colour, spec.pattern, spec.colour2, cx, cy, size)
        out.append(render_scene([s], bg, seed=int(rng.integers(2**31))))
    return out
