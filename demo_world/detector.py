"""Find the demo world's objects in a 64x64 image by colour and shape (no learning, OpenCV connected components).

1. Background: the palette background that most pixels are near.
2. Every pixel gets the nearest object palette colour if it is within `tol` of it and nearer to it than to the
   background; otherwise it is background.
3. Per colour, the colour mask is closed with a small disc (bridges the 3-px stripes and the dots of a second
   colour) and split into connected components. Each component's object mask is the component's pixels of the
   main colour plus those of its pattern colour (the most frequent other colour inside the closed component).
   A component that is mostly another candidate's pattern (or the same region seen from its second colour,
   which has fewer pixels) is dropped, so a patterned object is one detection.
4. Category from shape: a hole -> ring; low solidity (area / convex hull area, ~0.55 for the star) -> star;
   otherwise fill of the bounding box: ~1 box, ~0.785 ball, ~0.5 tent.

Occlusion: a partly hidden object is detected by its visible pixels (its box is the visible extent), so the tests
measure IoU only on objects that are (almost) fully visible; hidden ones may be missed or mis-shaped.
Known limit: two same-coloured objects closer than ~4 px merge into one detection.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .scenes import BACKGROUNDS, COLOURS, SIZE

_OBJ_NAMES = list(COLOURS)
_OBJ_RGB = np.array([COLOURS[c] for c in _OBJ_NAMES], dtype=np.float32)  # [6, 3]
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)  # [4, 3]
_CLOSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_3X3 = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class Detection:
    category: str
    colour: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1] of the canvas, of the visible pixels
    mask: np.ndarray  # [H, W] bool
    pattern: str  # "plain" | "striped" | "dotted" (a guess)
    colour2: str | None
    area: int  # pixels


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr[..., :3]


def detect_background(image) -> str:
    img = _as_array(image).reshape(-1, 3).astype(np.float32)  # [HW, 3]
    d = np.linalg.norm(img[:, None, :] - _BG_RGB[None], axis=-1)  # [HW, 4]
    return _BG_NAMES[int(np.bincount(d.argmin(1), minlength=len(_BG_NAMES)).argmax())]


def colour_labels(image, tol: float = 60.0) -> tuple[np.ndarray, str]:
    """[H, W] int: index into COLOURS of each pixel's object colour, -1 for background / unknown."""
    img = _as_array(image).astype(np.float32)  # [H, W, 3]
    bg = detect_background(img)
    d_obj = np.linalg.norm(img[..., None, :] - _OBJ_RGB, axis=-1)  # [H, W, 6]
    d_bg = np.linalg.norm(img - _BG_RGB[_BG_NAMES.index(bg)], axis=-1)  # [H, W]
    lab = d_obj.argmin(-1)
    best = d_obj.min(-1)
    lab[(best > tol) | (best >= d_bg)] = -1
    return lab, bg


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h)


def classify_shape(mask: np.ndarray) -> str:
    """Category of one object's (visible) mask."""
    m8 = mask.astype(np.uint8)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(m8[y0:y1, x0:x1], 1)  # [h+2, w+2]
    # fill holes: flood the outside from the corner; what is neither outside nor object is a hole
    flood = crop.copy()
    ff = np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 2)
    holes = flood == 0
    area = float(crop.sum())
    filled = area + float(holes.sum())
    if holes.sum() >= max(3.0, 0.08 * filled):
        return "ring"
    contours, _ = cv2.findContours((crop > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate(contours)
    hull = cv2.convexHull(pts)
    hull_area = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0  # pixel-area hull (incl. border)
    solidity = filled / hull_area
    fill = filled / float((y1 - y0) * (x1 - x0))
    if solidity < 0.75:
        return "star"
    if fill > 0.9:
        return "box"
    if fill > 0.64:
        return "ball"
    return "tent"


def _pattern_of(sec: np.ndarray) -> str:
    """'dotted' if the second-colour pixels form small compact blobs, else 'striped'."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(sec.astype(np.uint8), connectivity=8)
    if n <= 1:
        return "plain"
    areas = stats[1:, cv2.CC_STAT_AREA]
    ext = np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT])
    return "dotted" if np.median(areas) <= 16 and np.median(ext) <= 6 else "striped"


def detect(image, tol: float = 60.0, min_area: int = 12, pattern_frac: float = 0.08) -> list[Detection]:
    """Objects in `image` ([H, W, 3] uint8 RGB or PIL), largest first."""
    lab, _ = colour_labels(image, tol)  # [H, W]
    cands = []  # (main colour idx, closed component mask, second colour idx or None)
    for c in range(len(_OBJ_NAMES)):
        mc = (lab == c).astype(np.uint8)
        if mc.sum() < min_area:
            continue
        closed = cv2.morphologyEx(mc, cv2.MORPH_CLOSE, _CLOSE)
        n, comp = cv2.connectedComponents(closed, connectivity=8)
        for k in range(1, n):
            region = comp == k  # [H, W]
            own = int((region & (lab == c)).sum())
            if own < min_area:
                continue
            others = lab[region & (lab >= 0) & (lab != c)]
            second = None
            if len(others):
                counts = np.bincount(others, minlength=len(_OBJ_NAMES))
                j = int(counts.argmax())
                if counts[j] >= pattern_frac * region.sum() and counts[j] < own:
                    second = j
            cands.append((c, region, second, own))
    # each candidate's object mask: its main colour plus its pattern colour (grown a few px past the rim)
    masks = []
    for c, region, second, _own in cands:
        if second is None:
            masks.append((region & (lab == c), np.zeros_like(region)))
            continue
        allowed = (region | (lab == second)).astype(np.uint8)
        grown = region.astype(np.uint8)
        for _ in range(5):  # geodesic growth: at most 5 px through second-colour pixels (thin tips)
            grown = cv2.dilate(grown, _3X3) & allowed
        sec = grown.astype(bool) & (lab == second)
        masks.append(((region & (lab == c)) | sec, sec))
    dets = []
    for i, (c, region, second, own) in enumerate(cands):
        # drop a candidate that is mostly the pattern of a bigger candidate
        if any(
            j != i and cands[j][2] == c and cands[j][3] > own and (masks[j][1] & (lab == c) & region).sum() >= 0.5 * own
            for j in range(len(cands))
        ):
            continue
        mask, sec = masks[i]
        pattern = _pattern_of(sec) if second is not None else "plain"
        dets.append(
            Detection(
                category=classify_shape(mask),
                colour=_OBJ_NAMES[c],
                box=_box(mask),
                mask=mask,
                pattern=pattern,
                colour2=_OBJ_NAMES[second] if second is not None and pattern != "plain" else None,
                area=int(mask.sum()),
            )
        )
    dets.sort(key=lambda d: -d.area)
    return dets


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluable(o, objects, min_visible: float = 0.95, gap: int = 5) -> bool:
    """True if ground-truth object `o` is (almost) fully visible and no other object sharing one of its colours
    comes within `gap` px of it (the detector measures visible, colour-separated objects)."""
    from .scenes import shape_mask

    full = shape_mask(o.category, o.spec.cx, o.spec.cy, o.spec.size)
    if o.mask.sum() < min_visible * full.sum():
        return False
    near = cv2.dilate(full.astype(np.uint8), np.ones((2 * gap + 1, 2 * gap + 1), np.uint8)).astype(bool)
    mine = {o.colour, o.colour2} - {None}
    for p in objects:
        if p is o or not (mine & ({p.colour, p.colour2} - {None})):
            continue
        if (near & p.mask).any():
            return False
    return True


def match(dets: list[Detection], objects, min_visible: float = 0.95) -> list[tuple[object, Detection | None, float]]:
    """Greedy match of the evaluable ground-truth objects (see `evaluable`) to detections by box IoU.
    Returns (object, detection or None, iou) per evaluated object."""
    out, used = [], set()
    for o in objects:
        if not evaluable(o, objects, min_visible):
            continue
        best, bi = 0.0, None
        for i, d in enumerate(dets):
            if i in used:
                continue
            iou = box_iou(o.box, d.box)
            if iou > best:
                best, bi = iou, i
        if bi is not None:
            used.add(bi)
        out.append((o, dets[bi] if bi is not None else None, best))
    return out


def canvas_size() -> int:
    return SIZE
