"""Whole-process time of `python -m studio generate` against a plain diffusers script making the same image.

    python -m evals.startup_time [--repeats 5]

Both run in fresh processes on the demo model (same prompt, seed, steps, CFG and scheduler, one PNG written), taking
turns so that machine load hits them alike; the medians and their ratio are printed. Without boxes Troupe's image is
bit-identical to the plain pipeline's, so the difference is Troupe's own start-up and bookkeeping; the boxed run adds
layout guidance on top.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engines.models import DEMO_MODEL_DIR

PROMPT = "a red ball next to a blue box on grass"
PLAIN_SCRIPT = f"""
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(DEMO_MODEL_DIR)!r}, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
image = pipe({PROMPT!r}, num_inference_steps=20, guidance_scale=7.5,
             generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
image.save(sys.argv[1])
"""
TROUPE = [sys.executable, "-m", "studio", "generate", "--prompt", PROMPT, "--seed", "7"]
BOXES = ["--box", "red ball=0.05,0.3,0.45,0.75", "--box", "blue box=0.55,0.3,0.95,0.75@1"]


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "plain.py"
        script.write_text(PLAIN_SCRIPT)
        commands = {
            "plain diffusers script": [sys.executable, str(script), f"{folder}/plain.png"],
            "python -m studio generate": TROUPE + ["--out", f"{folder}/troupe.png"],
            "python -m studio generate, 2 boxes": TROUPE + BOXES + ["--out", f"{folder}/boxes.png"],
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                samples[name].append(seconds(command))
    baseline = statistics.median(samples["plain diffusers script"])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:36s} {median:6.2f} s (median of {len(values)})  {median / baseline:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
