"""Does an image show "A <relation> B"? Reads the relation's geometry from the pixels of the two objects.

The objects are found by colour with demo_world/detector.py (`detect`: palette labels, closing, components, pattern
pixels joined to their object); A is the largest detection of A's colour, B of B's (or, where `detect` dropped an
object as a neighbour's pattern, the largest component of its colour in `colour_labels`). Then, on their masks:
- tilt: how far A is turned from upright, in degrees. A box-like mask (its bounding rectangle's area changes by a
  factor >= 1.4 as it turns: it has corners) reads it from cv2.minAreaRect; a triangle-like mask (its hull fills
  >= 75 % of cv2.minEnclosingTriangle: the tent) from that triangle's axis; any other mask from its principal axis
  (second moments). minAreaRect fails on the tent:
  every side of an acute triangle gives a bounding rectangle of the same area (twice the triangle's), so an
  upright tent reads 0 or 26.6 degrees at the whim of a pixel; and the tent's second moments differ by only 14 %,
  so pixel steps turn its principal axis by up to 17 degrees on a 14 px tent. A round mask (ball, ring, star:
  equal moments) has no axis and reads 0.
- contact: the least distance between A's and B's pixels (pixel centres; touching neighbours are 1 px apart).
- contained: the share of A's pixels inside B's filled convex hull (B's own pixels around a hole where A sits).
- centre_offset: distance between the centres of A's box and of B's hull's box, over B's side (the larger one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from demo_world.detector import Detection, colour_labels, detect
from demo_world.relation_scenes import CATEGORIES_AB, IN_THE_MIDDLE_OF, LEANING_ON
from demo_world.scenes import COLOURS

# Rendered "leaning on" scenes tilt A by 20-35 deg and measure within 3.3 deg of that (18.4-36.4 deg over 1000
# scenes and the "apart" controls); upright boxes and tents measure 0.0. 10 deg sits between with margin on both
# sides, and an object tilted less than 10 deg does not read as leaning to a person either.
TILT_MIN_DEGREES = 10.0
# Touching objects are 1 px apart when rendered (A drawn over B). Blur leaves the seam between two colours in
# neither (touching objects then measure 2-4 px apart at sigma 0.6-1 px) while the "apart" control's 6-10 px gaps
# measure >= 4.2 px; 3 px keeps blurred contact (2 px: 93 % -> 3 px: 96 % of blurred scenes correct at sigma 0.6).
# scenes.py's "next to" (1-6 px gaps) may count as contact: tilt tells it apart.
CONTACT_PX = 3.0
# A in the middle of B is fully inside B's hull (1.0 when rendered); 0.9 forgives a blurred rim in a generated image.
CONTAINED_MIN = 0.9
# Rendered "in the middle of" scenes centre A within 1.5 px (measured offset <= 0.09 of B's 28-40 px side); the
# controls put A's centre >= 0.3 of B's side away (measured >= 0.24: B's hull loses what A hides). 0.2 is between.
CENTRE_OFFSET_MAX = 0.2
# _rectangle_contrast on 10-40 px shapes turned by up to 40 deg: box 1.53-1.97, ring <= 1.33, ball <= 1.27 (the
# top ends at 10 px), star <= 1.19, tent <= 1.16
BOX_LIKE_CONTRAST = 1.4
# convex hull area / cv2.minEnclosingTriangle area: tent 0.92-1.0 (0.80 blurred, dots lost), box 0.50-0.57 (0.62
# blurred), ball 0.58-0.62, star 0.56-0.64
TRIANGLE_LIKE_FILL = 0.75
# (l1 - l2) / (l1 + l2) of the second moments, on 10-40 px shapes: ball <= 0.06, ring <= 0.07, star <= 0.18 (pixel
# steps on small stars), a 2:1 bar 0.6. Below 0.2 a mask has no axis worth reading (boxes and tents never get here)
ROUND_ANISOTROPY = 0.2


@dataclass(frozen=True)
class RelationScore:
    relation: str
    found: bool  # both objects detected (by colour)
    correct: bool  # the geometry says "A <relation> B"
    tilt_degrees: float  # A from upright, >= 0 (box-like masks <= 45, tents <= 60, others <= 90); nan when not found
    contact: bool  # A and B touch or overlap (distance_px <= CONTACT_PX)
    distance_px: float  # least distance between A's and B's pixels; touching reads 1 (A hides what it overlaps)
    contained: float  # share of A's pixels inside B's filled hull, [0, 1]
    centre_offset: float  # |centre of A - centre of B| / B's side


def find_object(
    image, detections: list[Detection], colour: str, tol: float = 60.0, min_area: int = 12
) -> np.ndarray | None:
    """[H, W] bool mask of the object of `colour`: its largest detection, else (the detector dropped it as the
    pattern of a neighbour: a small object beside another's stripes of its own pattern colour) its largest
    component of that colour as `colour_labels` reads it; None when there is none."""
    found = next((d for d in detections if d.colour == colour), None)  # detections come largest first
    if found is not None:
        return found.mask
    labels, _ = colour_labels(image, tol)  # [H, W] index into COLOURS, -1 elsewhere
    own = (labels == list(COLOURS).index(colour)).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(own, connectivity=8)
    if count <= 1 or stats[1:, cv2.CC_STAT_AREA].max() < min_area:
        return None
    return components == 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())


def measure_tilt(mask: np.ndarray, box: bool = False) -> float:
    """Degrees between the object in `mask` ([H, W] bool) and its upright pose (see the module docstring). `box`:
    the object is known to be a box (the leaning object of "leaning on" always is), so its minimum-area rectangle is
    read even when lost pattern dots at its corners make its outline look round."""
    points = cv2.findNonZero(mask.astype(np.uint8))  # [N, 1, 2] pixel indices (x, y)
    hull = cv2.convexHull(points)  # [K, 1, 2]
    if box or _rectangle_contrast(hull.reshape(-1, 2).astype(np.float64)) >= BOX_LIKE_CONTRAST:
        angle = cv2.minAreaRect(points)[2] % 90.0
        return float(min(angle, 90.0 - angle))  # a square looks the same every 90 deg
    area, triangle = cv2.minEnclosingTriangle(points.astype(np.float32))
    if cv2.contourArea(hull) >= TRIANGLE_LIKE_FILL * area:
        return _triangle_tilt(triangle.reshape(3, 2))
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    mu20, mu02, mu11 = m["mu20"], m["mu02"], m["mu11"]
    if math.hypot(mu20 - mu02, 2.0 * mu11) <= ROUND_ANISOTROPY * (mu20 + mu02):
        return 0.0  # no axis to measure
    major = 0.5 * math.degrees(math.atan2(2.0 * mu11, mu20 - mu02))  # the long axis from the x axis, (-90, 90]
    return float(90.0 - abs(major))  # from the vertical


def _rectangle_contrast(hull: np.ndarray) -> float:
    """Largest over smallest area of the bounding rectangle of the points `hull` ([K, 2] pixels) turned through
    0-89 degrees: a square 2 (at 45 deg to its sides), anything round about 1. It reads the outline's extent, not
    how much of it the mask fills, so a box with notches (lost dots at its rim) still has corners."""
    angles = np.radians(np.arange(90.0))  # [90]
    along = hull @ np.stack([np.cos(angles), np.sin(angles)])  # [K, 90]
    across = hull @ np.stack([-np.sin(angles), np.cos(angles)])  # [K, 90]
    areas = (np.ptp(along, 0) + 1.0) * (np.ptp(across, 0) + 1.0)  # [90] (+1: pixels, not their centres)
    return float(areas.max() / areas.min())


def _triangle_tilt(corners: np.ndarray) -> float:
    """Degrees from upright of a tent fitted by the triangle `corners` ([3, 2] pixels): its axis runs from the middle
    of the base to the apex. The apex is the corner whose axis points most nearly up: the two other corners' axes
    lie 116.6 deg from the apex's, so this is right for any tilt under 58 deg, where picking the sharpest corner
    (53 vs 63 deg) fails on small tents."""
    tilts = []
    for k in range(3):
        axis = corners[k] - (corners[(k + 1) % 3] + corners[(k + 2) % 3]) / 2.0  # (dx, dy), y down
        tilts.append(abs(math.degrees(math.atan2(float(axis[0]), float(-axis[1])))))
    return float(min(tilts))


def mask_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Least distance (pixels, between pixel centres) from any pixel of `a` to any of `b`; 0 where they overlap."""
    to_b = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # [H, W] float32
    return float(to_b[a].min())


def _filled_hull(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: the convex hull of `mask`'s pixels, filled (holes and notches included)."""
    hull = cv2.convexHull(cv2.findNonZero(mask.astype(np.uint8)))
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def _centre(mask: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, side) of `mask`'s box, pixels; side = the larger of width and height."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, float(max(x1 - x0, y1 - y0))


def score_relation(image, relation: str, a_colour: str, b_colour: str, tol: float = 60.0) -> RelationScore:
    """Measure "A <relation> B" in `image` ([H, W, 3] uint8 RGB or PIL), A and B named by their main colour."""
    if relation not in (LEANING_ON, IN_THE_MIDDLE_OF):
        raise ValueError(f"unknown relation {relation!r}; expected {LEANING_ON!r} or {IN_THE_MIDDLE_OF!r}")
    if a_colour == b_colour:
        raise ValueError("A and B need different colours: the scorer tells them apart by colour")
    detections = detect(image, tol=tol)
    a, b = find_object(image, detections, a_colour, tol), find_object(image, detections, b_colour, tol)  # [H, W]
    if a is None or b is None:
        nan = float("nan")
        return RelationScore(relation, False, False, nan, False, nan, nan, nan)
    tilt = measure_tilt(a, box=CATEGORIES_AB[LEANING_ON][0] == ("box",))
    distance = mask_distance(a, b)
    hull = _filled_hull(b)
    contained = float((a & hull).sum() / a.sum())
    (ax, ay, _), (bx, by, side) = _centre(a), _centre(hull)
    offset = math.hypot(ax - bx, ay - by) / side
    contact = distance <= CONTACT_PX
    if relation == LEANING_ON:
        correct = tilt >= TILT_MIN_DEGREES and contact
    else:
        correct = contained >= CONTAINED_MIN and offset <= CENTRE_OFFSET_MAX
    return RelationScore(relation, True, bool(correct), tilt, contact, distance, contained, offset)
