"""What every command shares: the model options, the library option, and one progress line on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading

from engines.types import DTYPES, JOB_CAPS, OFFLOADS, QUANTIZATIONS, JobCap, ModelSpec
from studio.cli.progress import print_progress  # the commands import it from here


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="demo, a Hub id, a diffusers folder or a .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="; ".join(f"{name}: {q.about}" for name, q in QUANTIZATIONS.items())
        + " (registration trains float copies of quantized text encoders)",
    )
    parser.add_argument("--offload", choices=OFFLOADS, default="none")
    parser.add_argument(
        "--reference-adapter",
        default="auto",
        metavar="auto|none|FILE.safetensors",
        help="the LoRA that teaches self-attention to read the subjects' photos (SynCD); auto: the demo model's own",
    )
    add_model_extras(parser)


def add_job_cap_argument(parser: argparse.ArgumentParser) -> None:
    """The studio's `--job-cap` (app.py and `python -m studio ui`)."""
    parser.add_argument(
        "--job-cap",
        choices=("none", *JOB_CAPS),
        default=None,
        help="what one visitor's job may cost (size, steps, images) and one job per visitor at a time: "
        "none by default on a desktop; a Space always uses shared",
    )


def job_cap_of(args: argparse.Namespace, shared: bool = False) -> JobCap | None:
    """The cap `--job-cap` names; a shared studio's (a Space's) when none is named and `shared`."""
    return JOB_CAPS.get(args.job_cap or ("shared" if shared else "none"))


def add_model_extras(parser: argparse.ArgumentParser) -> None:
    """--vae, --embedding and --compile: every command that loads a model, the UI's included."""
    parser.add_argument("--vae", default=None, metavar="PATH", help="a diffusers VAE folder or a .safetensors VAE")
    parser.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE.safetensors",
        help="a textual-inversion embedding (repeatable); a prompt names it by the file's stem, as A1111 does, or "
        "as embedding:STEM (ComfyUI); <name> stays a subject",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (with CUDA graphs on a GPU): faster steps after a first image that compiles "
        "for a minute or more per image size; box fitting and registration stay eager",
    )


def with_model_extras(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    """`spec` (from a machine preset, the UI's make_studio) with the --vae, --embedding and --compile of `args`."""
    return dataclasses.replace(spec, vae=args.vae, embeddings=tuple(args.embedding), compile=args.compile)


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The one place where the model options become a ModelSpec."""
    return ModelSpec(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        offload=args.offload,
        device=args.device,
        reference_adapter=args.reference_adapter,
        vae=args.vae,
        embeddings=tuple(args.embedding),
        compile=args.compile,
    )


def add_library_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--library", default=None, help="subject library folder (default $TROUPE_LIBRARY or ~/.troupe/library)"
    )


def studio_for(args: argparse.Namespace, with_model: bool = True):
    """The engines' Studio for these options (imported here, so that parsing arguments never loads torch)."""
    from engines.service import Studio

    return Studio(model_spec(args) if with_model else None, getattr(args, "library", None))


def train_with_progress(args: argparse.Namespace, train):
    """Load the model, then run `train(studio, on_progress, cancel)` with one progress line; Ctrl-C sets `cancel`, so
    the trainer stops between steps and keeps its checkpoint (the same command resumes)."""
    studio = studio_for(args)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        return train(studio, print_progress, cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
