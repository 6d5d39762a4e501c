"""Two relations the demo model never saw, drawn procedurally: examples for learned relations (DreamRelation).

- "leaning on" (a pose change): A (box or tent) is rotated towards an upright B (ball, box, tent or star), a box by
  20-35 degrees, a tent by 28-35 (see TILT_RANGE); both stand on one baseline and A's upper half touches B's side
  (A is moved towards B until it first overlaps B by a pixel). A is drawn last (in front).
- "in the middle of" (containment): a small A (ball, box, tent or star) sits fully inside a large B (box or ball,
  28-40 px), centred on it within 1.5 px; A in front.

Every scene is a function of (relation, seed, allowed pairs) and follows scenes.py's conventions: its palette, its
backgrounds with their noise (taken from `render_scene`), flat objects with stripes/dots anchored at the object's
centre; a rotated object's shape and pattern are tested in its own rotated frame, so the pattern turns with it.
Control scenes (`render_control`) draw the same pairs in poses that are NOT the relation, for the scorer's tests.
A pair is (colour_a, category_a, colour_b, category_b); A and B never share a colour (the scorer finds them by
colour), nor a pattern colour.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from demo_world.scenes import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    DOT_PERIOD,
    DOT_RADIUS,
    SIZE,
    STRIPE_PERIOD,
    STRIPE_WIDTH,
    ObjectSpec,
    pattern_mask,
    render_scene,
    shape_mask,
)

LEANING_ON, IN_THE_MIDDLE_OF = "leaning on", "in the middle of"
TEMPLATES: dict[str, str] = {LEANING_ON: "{a} leaning on {b}", IN_THE_MIDDLE_OF: "{a} in the middle of {b}"}
# (categories of A, categories of B): B's interior must hold A for "in the middle of", so only the full shapes
CATEGORIES_AB: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    LEANING_ON: (("box",), ("ball", "box", "tent", "star")),  # a leaning box reads as leaning; a tent does not (below)
    IN_THE_MIDDLE_OF: (("ball", "box", "tent", "star"), ("box", "ball")),
}
# A tent's apex only reaches further towards B than its near base corner once tan(tilt) > 1/2 (26.6 deg); below
# that the base corner touches first, so tents lean 28-35 deg (its near side then stands about upright, flush with
# B: the tent reads as a triangle turned on its side more than as leaning). A tent never leans on a tent: their
# sloped sides meet at the base for any tilt under 53 deg.
TILT_RANGE: dict[str, tuple[float, float]] = {"box": (20.0, 35.0), "tent": (28.0, 35.0)}
EXCLUDED_PAIRS: dict[str, set[tuple[str, str]]] = {LEANING_ON: {("tent", "tent")}, IN_THE_MIDDLE_OF: set()}
CONTROL_KINDS: dict[str, tuple[str, ...]] = {
    LEANING_ON: ("next to", "in front of", "upright", "apart"),  # upright: A untilted; apart: tilted, no contact
    IN_THE_MIDDLE_OF: ("next to", "in front of", "on top of"),
}
_CONTROL_WORDS = {"next to": "next to", "in front of": "in front of", "on top of": "on top of",
                  "upright": "next to", "apart": "near"}  # fmt: skip
# Keypoints in an object's own frame, in units of its half-size (x right, y down), 5 per object in a fixed order:
# box TL, TR, BR, BL, centre; tent apex, base right, base left, base middle, centre; ball/ring top, right, bottom,
# left, centre; star its five outer vertices clockwise from the top.
_STAR_VERTICES = np.radians([0.0, 72.0, 144.0, 216.0, 288.0])  # clockwise from "up", as scenes.shape_mask draws it
KEYPOINTS_LOCAL: dict[str, np.ndarray] = {
    "box": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [0, 0]], np.float64),
    "tent": np.array([[0, -1], [1, 1], [-1, 1], [0, 1], [0, 0]], np.float64),
    "ball": np.array([[0, -1], [1, 0], [0, 1], [-1, 0], [0, 0]], np.float64),
    "ring": np.array([[0, -1], [1, 0], [0, 1], [-1, 0], [0, 0]], np.float64),
    "star": np.stack([np.sin(_STAR_VERTICES), -np.cos(_STAR_VERTICES)], 1),
}
_OUTLINE = {"box": KEYPOINTS_LOCAL["box"][:4], "tent": KEYPOINTS_LOCAL["tent"][:3]}  # polygon vertices
HELD_OUT_COMBOS = 6  # of the 30 ordered (colour_a, colour_b) combinations, kept out of training
_SALT = {LEANING_ON: 4101, IN_THE_MIDDLE_OF: 4102}
MAX_TRIES = 200  # rejection sampling of a pose; a few tries suffice (see the tests)

Pair = tuple[str, str, str, str]  # (colour_a, category_a, colour_b, category_b)
# pixel-centre coordinates, built exactly as scenes.py builds its own (so an unturned shape is scenes.shape_mask)
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # [64, 64] each


@dataclass(frozen=True)
class RelationObject:
    phrase: str  # "red box": words of the prompt
    spec: ObjectSpec  # category, colours, pattern, centre and size (pixels)
    angle: float  # degrees, clockwise on screen (positive: the top moves right)
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the whole shape
    mask: np.ndarray  # [64, 64] bool, visible pixels
    keypoints: tuple[tuple[float, float], ...]  # 5 points (x, y) in [0, 1], order of KEYPOINTS_LOCAL


@dataclass(frozen=True)
class RelationScene:
    relation: str  # the relation drawn, or the relation whose control this is
    kind: str  # "relation", or the control kind (CONTROL_KINDS)
    image: np.ndarray  # [64, 64, 3] uint8 RGB
    prompt: str
    background: str
    objects: tuple[RelationObject, RelationObject]  # slot a, slot b
    pair: Pair


# ------------------------------------------------------------------------------------------------ pairs


def all_pairs(relation: str) -> tuple[Pair, ...]:
    cats_a, cats_b = CATEGORIES_AB[_check(relation)]
    return tuple(
        (ca, ka, cb, kb)
        for ca in COLOURS
        for cb in COLOURS
        if ca != cb
        for ka in cats_a
        for kb in cats_b
        if (ka, kb) not in EXCLUDED_PAIRS[relation]
    )


def split_pairs(
    relation: str, seed: int = 0, held_out: int = HELD_OUT_COMBOS
) -> tuple[tuple[Pair, ...], tuple[Pair, ...]]:
    """(train, held-out) pairs: held-out pairs use (colour_a, colour_b) combinations no training pair has, while every
    colour still appears in training as A and as B (so only the combination is new)."""
    rng = np.random.default_rng([seed, _SALT[_check(relation)], 7])
    combos = [(a, b) for a in COLOURS for b in COLOURS if a != b]
    held: list[tuple[str, str]] = []
    for index in rng.permutation(len(combos)):
        combo = combos[index]
        rest = [c for c in combos if c not in held and c != combo]
        if len(held) < held_out and all(any(r[0] == c for r in rest) and any(r[1] == c for r in rest) for c in COLOURS):
            held.append(combo)
    pairs = all_pairs(relation)
    return tuple(p for p in pairs if (p[0], p[2]) not in held), tuple(p for p in pairs if (p[0], p[2]) in held)


def _check(relation: str) -> str:
    if relation not in TEMPLATES:
        raise ValueError(f"unknown relation {relation!r}; expected one of {tuple(TEMPLATES)}")
    return relation


# ----------------------------------------------------------------------------------------- rotated shapes


def _local(cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the object's own frame: [64, 64] each (undo the clockwise rotation by `angle` degrees)."""
    c, s = float(np.cos(np.radians(angle))), float(np.sin(np.radians(angle)))
    dx, dy = _XX - cx, _YY - cy
    return c * dx + s * dy, c * dy - s * dx


def rotated_shape_mask(category: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """[64, 64] bool: scenes.shape_mask turned clockwise by `angle` degrees about its centre (box and tent; round
    shapes need no turn). At angle 0 it is exactly scenes.shape_mask."""
    if category in ("ball", "ring") or (category == "star" and angle == 0):
        return shape_mask(category, cx, cy, size)
    if category not in _OUTLINE:
        raise ValueError(f"{category!r} cannot be rotated; rotatable: {tuple(_OUTLINE)}")
    r, (u, v) = size / 2.0, _local(cx, cy, angle)
    if category == "box":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    return (v <= r) & (np.abs(u) <= (v + r) / 2.0)  # tent: the same test as scenes.shape_mask, in the turned frame


def rotated_pattern_mask(pattern: str, cx: float, cy: float, angle: float) -> np.ndarray:
    """[64, 64] bool: scenes.pattern_mask in the object's turned frame (stripes and dots turn with the object)."""
    if pattern == "plain":
        return pattern_mask(pattern, cx, cy)
    u, v = _local(cx, cy, angle)
    if pattern == "striped":
        return np.mod((u + v) / np.sqrt(2.0), STRIPE_PERIOD) < STRIPE_WIDTH
    if pattern == "dotted":
        gu, gv = u - np.round(u / DOT_PERIOD) * DOT_PERIOD, v - np.round(v / DOT_PERIOD) * DOT_PERIOD
        return gu * gu + gv * gv <= DOT_RADIUS * DOT_RADIUS
    raise ValueError(f"unknown pattern {pattern!r}")


def _to_screen(local: np.ndarray, spec: ObjectSpec, angle: float) -> np.ndarray:
    """[N, 2] points in the object's frame (units of its half-size) -> [N, 2] pixel coordinates."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    rot = np.array([[c, -s], [s, c]])  # clockwise on screen, since y points down
    return local * (spec.size / 2.0) @ rot.T + np.array([spec.cx, spec.cy])


def _extent(category: str, size: float, angle: float) -> tuple[float, float, float]:
    """(half-width, lowest y, highest y) of the turned shape relative to its centre, pixels."""
    if category not in _OUTLINE:
        return size / 2.0, size / 2.0, -size / 2.0
    pts = _to_screen(_OUTLINE[category], ObjectSpec(category, "red", cx=0.0, cy=0.0, size=size), angle)
    return float(np.abs(pts[:, 0]).max()), float(pts[:, 1].max()), float(pts[:, 1].min())


# --------------------------------------------------------------------------------------------- drawing


def _look(rng: np.random.Generator, category: str, colour: str, avoid: set[str]) -> dict:
    """scenes.py's look distribution (60 % plain, 20 % stripes, 20 % dots) with a second colour not in `avoid`."""
    u = rng.random()
    pattern = "plain" if u < 0.6 else ("striped" if u < 0.8 else "dotted")
    if pattern == "plain":
        return dict(category=category, colour=colour)
    others = [c for c in COLOURS if c != colour and c not in avoid]
    return dict(category=category, colour=colour, pattern=pattern, colour2=others[rng.integers(len(others))])


def _words(spec: ObjectSpec) -> str:
    words = f"{spec.colour} {spec.category}"
    if spec.pattern != "plain":
        words += f" with {spec.colour2} {'stripes' if spec.pattern == 'striped' else 'dots'}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _draw(items: Sequence[tuple[ObjectSpec, float]], background: str, seed: int, middle: str):
    """Draw [(B, angle), (A, angle)] back to front on scenes.py's noisy background: (image, (A, B), prompt)."""
    img = render_scene([], background, seed=seed, caption="").image.copy()  # [64, 64, 3] uint8, background + noise
    full = []
    for spec, angle in items:
        m = rotated_shape_mask(spec.category, spec.cx, spec.cy, spec.size, angle)  # [64, 64]
        img[m] = COLOURS[spec.colour]
        if spec.pattern != "plain":
            img[m & rotated_pattern_mask(spec.pattern, spec.cx, spec.cy, angle)] = COLOURS[spec.colour2]
        full.append(m)
    visible = [full[0] & ~full[1], full[1]]  # A (in front) hides part of B
    objects = []
    for (spec, angle), m, vis in zip(items, full, visible):
        ys, xs = np.nonzero(m)
        box = (xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE, (ys.max() + 1) / SIZE)
        kp = np.clip(_to_screen(KEYPOINTS_LOCAL[spec.category], spec, angle) / SIZE, 0.0, 1.0)  # [5, 2]
        kps = tuple((float(x), float(y)) for x, y in kp)
        box = tuple(float(v) for v in box)
        objects.append(RelationObject(f"{spec.colour} {spec.category}", spec, angle, box, vis, kps))
    b, a = objects
    rng = np.random.default_rng(seed)
    phrases = BACKGROUND_PHRASES[background]
    prompt = f"{_words(a.spec)} {middle} {_words(b.spec)} {phrases[rng.integers(len(phrases))]}"
    return img, (a, b), prompt


def _on_canvas(spec: ObjectSpec, angle: float) -> bool:
    half, low, high = _extent(spec.category, spec.size, angle)
    return half <= spec.cx <= SIZE - half and -high <= spec.cy <= SIZE - low


# ------------------------------------------------------------------------------------------------ poses


def _slide(a: ObjectSpec, angle: float, b_mask: np.ndarray, far: float, near: float) -> float:
    """The centre x (pixels) between `far` (no overlap) and `near` (overlap) where A first overlaps B (bisection)."""
    for _ in range(9):  # |far - near| < 64 px -> < 0.13 px
        mid = (far + near) / 2.0
        m = rotated_shape_mask(a.category, mid, a.cy, a.size, angle)
        far, near = (far, mid) if (m & b_mask).any() else (mid, near)
    return near


def _leaning(rng: np.random.Generator, ka: str, kb: str, kind: str) -> tuple[float, ...] | None:
    """One try at A against B's side: (ax, ay, sa, angle, bx, by, sb) or None when the try fails its checks.
    kind "relation": tilted, upper half touches; "upright": untilted, touching; "apart": tilted, 6-10 px gap."""
    sa = float(rng.uniform(14, 22))
    sb = float(rng.uniform(max(20.0, sa + 2.0), 34.0))
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: A stands left of B and leans right
    angle = 0.0 if kind == "upright" else side * float(rng.uniform(*TILT_RANGE[ka]))
    half, low, _ = _extent(ka, sa, angle)
    base = float(rng.uniform(max(sb, 2 * half) + 1.0, SIZE - 1.0))  # the common baseline (y, pixels)
    bx = float(rng.uniform(sb / 2, SIZE - sb / 2))
    b = ObjectSpec(kb, "red", cx=bx, cy=base - sb / 2, size=sb)
    b_mask = shape_mask(kb, b.cx, b.cy, b.size)
    a = ObjectSpec(ka, "blue", cx=bx, cy=base - low, size=sa)
    if not (rotated_shape_mask(ka, bx, a.cy, sa, angle) & b_mask).any():
        return None
    ax = _slide(a, angle, b_mask, bx - side * (sb / 2 + 2 * half + 2), bx)
    if kind == "relation":  # the first overlap must be in A's upper half (its own frame), on B's side
        ys, xs = np.nonzero(rotated_shape_mask(ka, ax, a.cy, sa, angle) & b_mask)
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        if (c * (ys.mean() + 0.5 - a.cy) - s * (xs.mean() + 0.5 - ax)) >= 0 or ys.mean() + 0.5 < b.cy - sb / 2 + 1:
            return None
    if kind == "apart":
        ax -= side * float(rng.uniform(6, 10))
    return ax, a.cy, sa, angle, bx, b.cy, sb


def _pose(rng: np.random.Generator, relation: str, kind: str, ka: str, kb: str) -> tuple | None:
    """(ax, ay, sa, angle, bx, by, sb) in pixels / degrees for one try, or None."""
    if relation == LEANING_ON and kind in ("relation", "upright", "apart"):
        return _leaning(rng, ka, kb, kind)
    if relation == LEANING_ON:  # next to / in front of: A as big as in the relation, B as tall
        sa, sb = float(rng.uniform(14, 22)), float(rng.uniform(20, 34))
    else:
        sb = float(rng.uniform(28, 40))
        fit = 2 * (sb / 2 - 3.5) / (np.sqrt(2) if kb == "ball" and ka in ("box", "tent") else 1.0)
        sa = float(rng.uniform(12, min(0.6 * sb, fit)))  # A fits inside B with >= 2 px to spare (after jitter)
    bx, by = (float(rng.uniform(sb / 2, SIZE - sb / 2)) for _ in range(2))
    if kind == "relation":  # in the middle of: centred within 1.5 px
        return bx + float(rng.uniform(-1.5, 1.5)), by + float(rng.uniform(-1.5, 1.5)), sa, 0.0, bx, by, sb
    if kind == "next to":  # scenes.py's "next to": one baseline, a 1-6 px gap
        side, gap = (1.0 if rng.random() < 0.5 else -1.0), float(rng.uniform(1, 6))
        base = by + sb / 2
        return bx - side * (sb / 2 + gap + sa / 2), base - sa / 2, sa, 0.0, bx, by, sb
    if kind == "on top of":  # scenes.py's "on top of": A rests on B's top edge, roughly centred
        return bx + float(rng.uniform(-3, 3)), by - sb / 2 - sa / 2, sa, 0.0, bx, by, sb
    if kind == "in front of":  # scenes.py's offsets; nearly centred draws are "in the middle of", not a control
        ox, oy = float(rng.uniform(-0.6, 0.6)) * sb, float(rng.uniform(0.1, 0.5)) * sb
        return (bx + ox, by + oy, sa, 0.0, bx, by, sb) if np.hypot(ox, oy) >= 0.3 * sb else None
    raise ValueError(f"unknown control kind {kind!r} for {relation!r}; expected one of {CONTROL_KINDS[relation]}")


# ---------------------------------------------------------------------------------------------- scenes


def _scene(relation: str, kind: str, seed: int, pairs: Sequence[Pair] | None) -> RelationScene:
    _check(relation)
    allowed = all_pairs(relation)
    pairs = allowed if pairs is None else tuple(tuple(p) for p in pairs)
    if not pairs or any(p not in allowed for p in pairs):
        raise ValueError(f"pairs for {relation!r} must be a non-empty subset of all_pairs({relation!r})")
    rng = np.random.default_rng([seed, _SALT[relation], (("relation",) + CONTROL_KINDS[relation]).index(kind)])
    ca, ka, cb, kb = pairs[rng.integers(len(pairs))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    look_b = _look(rng, kb, cb, {ca})
    look_a = _look(rng, ka, ca, {cb, look_b.get("colour2")})
    for _ in range(MAX_TRIES):
        pose = _pose(rng, relation, kind, ka, kb)
        if pose is None:
            continue
        ax, ay, sa, angle, bx, by, sb = pose
        a, b = ObjectSpec(cx=ax, cy=ay, size=sa, **look_a), ObjectSpec(cx=bx, cy=by, size=sb, **look_b)
        if _on_canvas(a, angle) and _on_canvas(b, 0.0):
            break
    else:
        raise RuntimeError(f"no pose for {relation!r} ({kind}) with seed {seed} in {MAX_TRIES} tries")
    middle = relation if kind == "relation" else _CONTROL_WORDS[kind]
    image, objects, prompt = _draw([(b, 0.0), (a, angle)], background, int(rng.integers(2**31)), middle)
    return RelationScene(relation, kind, image, prompt, background, objects, (ca, ka, cb, kb))


def render_relation(relation: str, seed: int, pairs: Sequence[Pair] | None = None) -> RelationScene:
    """One example of `relation`, fully determined by (seed, pairs); the pair is drawn from `pairs` (all by default)."""
    return _scene(relation, "relation", seed, pairs)


def render_control(relation: str, kind: str, seed: int, pairs: Sequence[Pair] | None = None) -> RelationScene:
    """A scene of the same pairs that is NOT `relation` (kind from CONTROL_KINDS[relation])."""
    if kind not in CONTROL_KINDS[_check(relation)]:
        raise ValueError(f"unknown control kind {kind!r} for {relation!r}; expected one of {CONTROL_KINDS[relation]}")
    return _scene(relation, kind, seed, pairs)


def write_relation_folder(folder, relation: str, seeds: Sequence[int], pairs: Sequence[Pair] | None = None,
                          with_masks: bool = True, with_keypoints: bool = True,
                          mirror: bool = True) -> tuple[RelationScene, ...]:  # fmt: skip
    """Write NN.png (+ NN_a.png / NN_b.png masks, L mode, 255 = visible object) and relation.json in the schema of
    engines/relations/examples.py; the same arguments give the same bytes. Returns the scenes written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes, examples = [], []
    for index, seed in enumerate(seeds, start=1):
        scene = render_relation(relation, int(seed), pairs)
        name = f"{index:02d}"
        Image.fromarray(scene.image).save(folder / f"{name}.png")
        objects = []
        for slot, obj in zip("ab", scene.objects):
            entry: dict = {"phrase": obj.phrase, "box": [round(v, 4) for v in obj.box]}
            if with_masks:
                Image.fromarray(obj.mask.astype(np.uint8) * 255).save(folder / f"{name}_{slot}.png")
                entry["mask"] = f"{name}_{slot}.png"
            if with_keypoints:
                entry["keypoints"] = [[round(x, 4), round(y, 4)] for x, y in obj.keypoints]
            objects.append(entry)
        examples.append({"image": f"{name}.png", "prompt": scene.prompt, "objects": objects})
        scenes.append(scene)
    data = {"relation": relation, "template": TEMPLATES[relation], "mirror": mirror, "examples": examples}
    (folder / "relation.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return tuple(scenes)


if __name__ == "__main__":  # python -m demo_world.relation_scenes "leaning on" OUT: a folder to teach the demo model
    import argparse

    parser = argparse.ArgumentParser(description="write a relation's examples from the demo world's training pairs")
    parser.add_argument("relation", choices=sorted(TEMPLATES))
    parser.add_argument("out", help="the folder to write (relation.json, images, masks)")
    parser.add_argument("--examples", type=int, default=12)
    args = parser.parse_args()
    write_relation_folder(args.out, args.relation, range(args.examples), split_pairs(args.relation)[0])
    print(f"wrote {args.examples} examples of '{args.relation}' to {args.out}")
