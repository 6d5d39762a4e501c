"""The README's subject figure: a subject registered from 5 demo photos, then placed in new compositions.

    python scripts/subject_figure.py --out assets/readme/subject.png

Top row: the 5 photos of "a blue ball with yellow stripes" it is registered from (quick preset, the class word
"ball"). Middle row: `<stripy>` in the subject bench's first compositions, with Troupe's default guidance. Bottom
row: the same prompts, layouts and seeds with the plain class word "ball". Images are upscaled 2x (nearest).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from engines.bench_subjects import (  # noqa: E402
    BENCH_SUBJECTS,
    PHOTOS_PER_SUBJECT,
    compositions,
    prompt_variants,
    write_subject_photos,
)
from engines.generate import Generator  # noqa: E402
from engines.library import SubjectLibrary  # noqa: E402
from engines.models import load_model  # noqa: E402
from engines.register import register_subject  # noqa: E402
from engines.types import GenerateRequest, ModelSpec, RegisterRequest  # noqa: E402

SCALE, GAP = 2, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="assets/readme/subject.png")
    args = parser.parse_args()
    bundle = load_model(ModelSpec(args.model))
    name, spec = BENCH_SUBJECTS[0]
    with tempfile.TemporaryDirectory(prefix="troupe-figure-") as folder:
        library = SubjectLibrary(Path(folder) / "library")
        photos = write_subject_photos(spec, Path(folder) / name)
        register_subject(bundle, RegisterRequest(name, spec.category, photos, preset="quick"), library)
        rows = [[Image.open(path).convert("RGB") for path in photos], [], []]
        generator = Generator(bundle)
        for composition in compositions(name, spec, PHOTOS_PER_SUBJECT):
            for row, (prompt, layout) in zip(rows[1:], prompt_variants(composition).values()):
                request = GenerateRequest(prompt, layout=layout, seed=composition.seed, steps=20, cfg=5.0)
                row.append(generator(request, {name: spec.category}, library.residuals).images[0])
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
