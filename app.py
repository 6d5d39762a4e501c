"""Troupe Studio in the browser: python app.py [--model demo|<hub id>|<path>] [--port 7860] [--library DIR].

`gradio app.py` runs it with hot reload (options after `--`: `gradio app.py -- --model demo`): an edit to a .py file
under this folder rebuilds the UI in the running server.

Also the entry of a Hugging Face Space: where the `spaces` package is importable (ZeroGPU), GPU handlers are wrapped
with spaces.GPU and a duration computed from their inputs, every visitor gets a private temporary subject library,
and the model is fixed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

try:  # must come before anything that could initialise CUDA
    import spaces  # type: ignore[import-not-found]
except ImportError:
    spaces = None

from studio import runtime_problem  # noqa: E402

if problem := runtime_problem(("gradio",)):
    raise SystemExit(problem)  # one line, not an import traceback, when run with a Python outside .venv

from studio.cli.common import add_job_cap_argument, add_model_extras, job_cap_of, with_model_extras  # noqa: E402
from studio.ui import build_ui, make_studio, serve  # noqa: E402


def gpu_wrapper(fn, seconds):
    """spaces.GPU with a per-call duration (ZeroGPU); outside a Space it is a no-op and never called."""
    return spaces.GPU(duration=seconds)(fn)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Troupe Studio")
    parser.add_argument(
        "--model",
        default=os.environ.get("TROUPE_MODEL", "demo"),
        help="demo, a Hub id, a local diffusers folder or a .safetensors file",
    )
    parser.add_argument("--library", default=None, help="subject library folder (default ~/.troupe/library)")
    parser.add_argument("--vram", default=None, help="machine preset of presets/vram.json: CPU, 8 GB, 24 GB, A100")
    parser.add_argument("--host", default=None, help="default 127.0.0.1 (or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="default 7860 (or $GRADIO_SERVER_PORT)")
    parser.add_argument(
        "--outputs",
        default=os.environ.get("TROUPE_OUTPUTS", "outputs"),
        help="folder for generated images and projects (default ./outputs or $TROUPE_OUTPUTS)",
    )
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_job_cap_argument(parser)
    add_model_extras(parser)
    return parser.parse_args(argv)


def build_demo(args: argparse.Namespace):
    """The studio's Blocks for these options (the model itself loads on first use, or now on a Space)."""
    on_space = bool(os.environ.get("SPACE_ID"))
    studio = make_studio(args.model, args.library, args.vram)
    studio.model_spec = with_model_extras(studio.model_spec, args)  # the model loads on first use
    per_user = Path(tempfile.gettempdir()) / "troupe-libraries" if on_space else None
    if on_space:
        studio.model_info()  # load once at start-up, before the first visitor (ZeroGPU moves it to the GPU)
    return build_ui(
        studio,
        per_user_library=per_user,
        gpu=gpu_wrapper if spaces is not None else None,
        allow_model_switch=not on_space,
        outputs_dir=None if on_space else args.outputs,
        job_cap=job_cap_of(args, shared=on_space),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serve(build_demo(args), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    # Hot reload (`gradio app.py`, app options after `--`) serves the module-level Blocks named `demo`, and runs this
    # file again in its watcher thread at start and after every edit, with __name__ still "__main__": there launch()
    # returns at once, and a sys.exit() would end the watcher, so the Blocks are kept in `demo` and nothing exits.
    cli_args = parse_args()
    demo = build_demo(cli_args)
    serve(demo, cli_args.host, cli_args.port, cli_args.share)
