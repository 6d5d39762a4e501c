"""The layered layout map (MS-CustomNet's M_L): a start image composed from the subjects' cut-outs, back to front.

Each region bound to a subject with photos gets that subject's first photo, cut out by its foreground mask, scaled
to fit the region's box (aspect kept, centred) and pasted in layer order, so the front layer covers the back one
where the boxes overlap — the same order that decides which subject's photos a cell reads in reference attention.
Everything else is a neutral grey that the denoising repaints. The generator encodes this image and starts
denoising from `start_strength` of the trajectory (image-to-image), so the picture begins with each subject where
and as large as its box says.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from engines.references import ReferencePhoto
from engines.types import InputError, Layout

BACKGROUND = (127, 127, 127)


def compose_collage(layout: Layout, photos: Sequence[ReferencePhoto], width: int, height: int) -> Image.Image:
    """The start image (RGB, width × height)."""
    first = {}
    for photo in photos:
        first.setdefault(photo.subject, photo)
    placed = [r for r in layout.back_to_front() if r.subject in first]
    if not placed:
        raise InputError("a collage start needs a region bound to a subject with photos: draw a box for <subject>")
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    for region in placed:
        cut_out, alpha = _cut_out(first[region.subject])
        x0, y0, x1, y1 = (round(v * s) for v, s in zip(region.box, (width, height, width, height)))
        box_w, box_h = max(1, x1 - x0), max(1, y1 - y0)
        scale = min(box_w / cut_out.width, box_h / cut_out.height)
        size = (max(1, round(cut_out.width * scale)), max(1, round(cut_out.height * scale)))
        left, top = x0 + (box_w - size[0]) // 2, y0 + (box_h - size[1]) // 2
        canvas.paste(cut_out.resize(size, Image.LANCZOS), (left, top), alpha.resize(size, Image.BILINEAR))
    return canvas


def _cut_out(photo: ReferencePhoto) -> tuple[Image.Image, Image.Image]:
    """The photo and its mask cropped to the mask's bounding box (the whole photo if the mask is empty)."""
    mask = photo.mask.convert("L").resize(photo.photo.size, Image.BILINEAR)
    bounds = mask.point(lambda v: 255 if v > 127 else 0).getbbox() or (0, 0, *photo.photo.size)
    return photo.photo.convert("RGB").crop(bounds), mask.crop(bounds)
