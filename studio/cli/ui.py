"""python -m studio ui: the studio in the browser (the same as `python app.py`). Gradio is imported only here, when
the command runs, so that every other command starts without it."""

from __future__ import annotations

import argparse

from studio.cli.common import (
    add_job_cap_argument,
    add_library_argument,
    add_model_extras,
    job_cap_of,
    with_model_extras,
)


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("ui", help="open the studio in the browser (Gradio)")
    parser.add_argument("--model", default="demo", help="demo, a Hub id, a local diffusers folder or .safetensors")
    add_library_argument(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--outputs", default="outputs", help="folder for generated images and projects")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--vram", default=None, help="machine preset from presets/vram.json (CPU, 8 GB, 24 GB, A100)")
    add_job_cap_argument(parser)
    add_model_extras(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.types.checks import require, whole

    # before the page is built: a port the server cannot open would end in Gradio's traceback, after all the work
    require(whole(args.port, 1, 65535), f"--port must be an integer in 1..65535 (got {args.port})")
    from studio.ui import build_ui, make_studio, serve

    studio = make_studio(args.model, args.library, args.vram)
    studio.model_spec = with_model_extras(studio.model_spec, args)  # the model loads on first use
    serve(build_ui(studio, outputs_dir=args.outputs, job_cap=job_cap_of(args)), args.host, args.port, args.share)
    return 0
