"""The README's subject figure: a subject registered from 5 demo photos, then placed in new compositions.

    python -m evals.subject_figure --out assets/readme/subject.png

Top row: the 5 photos of "a blue ball with yellow stripes" it is registered from (quick preset, the class word
"ball"). Middle row: `<stripy>` in the subject bench's first compositions, with Troupe's default guidance. Bottom
row: the same prompts, layouts and seeds with the plain class word "ball". Images are upscaled 2x (nearest).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from engines.service import Studio
from engines.types import GenerateRequest, ModelSpec, RegisterRequest
from evals.subject_bench import (
    BENCH_SUBJECTS,
    PHOTOS_PER_SUBJECT,
    compositions,
    prompt_variants,
    write_subject_photos,
)

SCALE, GAP = 2, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="assets/readme/subject.png")
    args = parser.parse_args()
    name, spec = BENCH_SUBJECTS[0]
    with tempfile.TemporaryDirectory(prefix="troupe-figure-") as folder:
        studio = Studio(ModelSpec(args.model), Path(folder) / "library")
        photos = write_subject_photos(spec, Path(folder) / name)
        studio.register(RegisterRequest(name, spec.category, photos, preset="quick"))
        rows = [[Image.open(path).convert("RGB") for path in photos], [], []]
        for composition in compositions(name, spec, PHOTOS_PER_SUBJECT):
            for row, (prompt, layout) in zip(rows[1:], prompt_variants(composition).values()):
                request = GenerateRequest(prompt, layout=layout, seed=composition.seed, steps=20, cfg=5.0)
                row.append(studio.generate(request).images[0])
    tile = 64 * SCALE
    figure = Image.new("RGB", (len(rows[0]) * (tile + GAP) + GAP, len(rows) * (tile + GAP) + GAP), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            figure.paste(picture.resize((tile, tile), Image.NEAREST), (GAP + c * (tile + GAP), GAP + r * (tile + GAP)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
