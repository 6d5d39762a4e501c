"""The README's demo figure: a few layouts drawn as boxes, then generated without and with Troupe's guidance, and with
box fitting on top.

    python -m evals.demo_figure --out assets/readme/demo.png

Each row: the requested layout (boxes in their colours, front layer drawn last), the demo model with no guidance,
with Troupe's default guidance, and with the default plus box fitting; same prompt, same seed. Images are upscaled 4x (nearest) so pixels stay
visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from demo_world.scenes import BACKGROUNDS, COLOURS
from engines.service import Studio
from engines.types import GUIDANCE_MODES, GenerateRequest, Layout, ModelSpec, Region

SCALE = 4
ROWS = (
    (
        "a red ball next to a blue box on grass",
        "grass",
        (Region("red ball", (0.05, 0.3, 0.45, 0.7)), Region("blue box", (0.55, 0.3, 0.95, 0.7))),
        7,
    ),
    (
        "a yellow star on top of a purple box on sand",
        "sand",
        (Region("purple box", (0.25, 0.5, 0.75, 0.95), layer=0), Region("yellow star", (0.3, 0.05, 0.7, 0.5), layer=1)),
        3,
    ),
    (
        "a cyan tent and an orange ring at night",
        "night",
        (Region("cyan tent", (0.05, 0.4, 0.5, 0.9)), Region("orange ring", (0.5, 0.05, 0.95, 0.5))),
        11,
    ),
)


def layout_picture(background: str, regions, size: int) -> Image.Image:
    picture = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(picture)
    for region in sorted(regions, key=lambda r: r.layer):
        colour = COLOURS[region.phrase.split()[0]]
        x0, y0, x1, y1 = (round(v * size) for v in region.box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=3)
        draw.text((x0 + 5, y0 + 4), region.phrase, fill=colour)
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="assets/readme/demo.png")
    args = parser.parse_args()
    studio = Studio(ModelSpec(args.model))
    tile = 64 * SCALE
    columns = [GUIDANCE_MODES[name].config for name in ("off", "troupe", "troupe-fitted")]
    figure = Image.new(
        "RGB", ((len(columns) + 1) * tile + (len(columns) + 2) * 8, len(ROWS) * tile + (len(ROWS) + 1) * 8), "white"
    )
    for row, (prompt, background, regions, seed) in enumerate(ROWS):
        tiles = [layout_picture(background, regions, tile)]
        for guidance in columns:
            request = GenerateRequest(prompt, layout=Layout(regions), seed=seed, cfg=5.0, guidance=guidance)
            tiles.append(studio.generate(request).images[0].resize((tile, tile), Image.NEAREST))
        for column, picture in enumerate(tiles):
            figure.paste(picture, (8 + column * (tile + 8), 8 + row * (tile + 8)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
