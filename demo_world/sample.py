"""Sample the demo model and measure it with the detector.

python -m demo_world.sample --model assets/demo_model --grid .cache/demo_grid.png --eval 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .detector import detect, detect_background

GRID_CAPTIONS = [
    "a red ball on grass",
    "a blue box and a yellow star on sand",
    "a purple tent in the sky",
    "a cyan ring at night",
    "an orange ball inside a blue ring",
    "a yellow box on top of a red box on grass",
    "a blue ball with yellow stripes on sand",
    "a red box with cyan dots on grass",
]

# caption -> (expected (colour, category) objects, expected background)
EVAL_CAPTIONS = {
    "a red ball on grass": ([("red", "ball")], "grass"),
    "a blue box and a yellow star on sand": ([("blue", "box"), ("yellow", "star")], "sand"),
    "a purple tent in the sky": ([("purple", "tent")], "sky"),
    "a cyan ring and an orange box at night": ([("cyan", "ring"), ("orange", "box")], "night"),
}


def load_pipeline(path: str | Path, scheduler: str = "ddim"):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, caption: str, seeds, steps: int = 20, cfg: float = 5.0) -> np.ndarray:
    """[N, 64, 64, 3] uint8, one image per seed."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(
        [caption] * len(gens), num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="np"
    ).images  # [N, 64, 64, 3] float in [0, 1]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def grid(pipe, captions, n: int = 6, steps: int = 20, cfg: float = 5.0, scale: int = 3):
    from PIL import Image

    rows = [np.concatenate(list(generate(pipe, c, range(n), steps, cfg)), axis=1) for c in captions]
    img = Image.fromarray(np.concatenate(rows, axis=0))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def evaluate(pipe, n: int = 50, steps: int = 20, cfg: float = 5.0, tol: float = 70.0) -> dict:
    """Per expected object: present (right colour AND category detected), colour-right-given-category,
    category-right-given-colour; plus background accuracy and extra detections per image."""
    tot = dict(
        objects=0, present=0, colour_ok=0, colour_n=0, category_ok=0, category_n=0, background_ok=0, images=0, extra=0
    )
    per_caption = {}
    for cap, (want, bg) in EVAL_CAPTIONS.items():
        imgs = generate(pipe, cap, range(1000, 1000 + n), steps, cfg)
        pres = 0
        for img in imgs:
            dets = detect(img, tol=tol, min_area=12)
            tot["images"] += 1
            tot["background_ok"] += detect_background(img) == bg
            tot["extra"] += max(0, len(dets) - len(want))
            for colour, cat in want:
                tot["objects"] += 1
                hit = any(d.colour == colour and d.category == cat for d in dets)
                pres += hit
                tot["present"] += hit
                same_cat = [d for d in dets if d.category == cat]
                if same_cat:
                    tot["colour_n"] += 1
                    tot["colour_ok"] += any(d.colour == colour for d in same_cat)
                same_col = [d for d in dets if d.colour == colour]
                if same_col:
                    tot["category_n"] += 1
                    tot["category_ok"] += any(d.category == cat for d in same_col)
        per_caption[cap] = pres / (n * len(want))
    return dict(
        presence=tot["present"] / tot["objects"],
        colour_acc=tot["colour_ok"] / max(1, tot["colour_n"]),
        category_acc=tot["category_ok"] / max(1, tot["category_n"]),
        background_acc=tot["background_ok"] / tot["images"],
        extra_per_image=tot["extra"] / tot["images"],
        per_caption=per_caption,
        seeds=n,
        steps=steps,
        cfg=cfg,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/demo_model")
    ap.add_argument("--grid", default=".cache/demo_grid.png")
    ap.add_argument("--eval", type=int, default=0, help="seeds per caption for the detector evaluation")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--scheduler", default="ddim", choices=["ddim", "euler"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model, a.scheduler)
    t0 = time.time()
    generate(pipe, "a red ball on grass", [0], a.steps, a.cfg)
    print(f"one image, {a.steps} steps: {time.time() - t0:.2f}s")
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        grid(pipe, GRID_CAPTIONS, steps=a.steps, cfg=a.cfg).save(a.grid)
        print(f"grid: {a.grid}")
    if a.eval:
        print(json.dumps(evaluate(pipe, a.eval, a.steps, a.cfg), indent=1))


if __name__ == "__main__":
    main()
