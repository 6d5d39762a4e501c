"""python -m studio references {dataset,train}: SynCD's synthetic dataset and the reference adapter trained on it."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import replace

from studio.cli.common import add_model_arguments, model_spec, print_progress


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("references", help="make a reference dataset, train a reference adapter")
    commands = parser.add_subparsers(dest="references_command", required=True)
    dataset = commands.add_parser(
        "dataset",
        help="write a customization dataset: several images of each object, with masks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="With --model demo the demo world renders each object in several scenes; with an SD model the "
        "views of one object are generated jointly with shared attention (SynCD's recipe). Ctrl-C keeps what is "
        "written; the same command again continues.",
    )
    add_model_arguments(dataset)
    dataset.add_argument("--out", required=True, help="the dataset folder")
    dataset.add_argument("--objects", type=int, default=4000, help="objects in all (skipped ones do not count)")
    dataset.add_argument("--views", type=int, default=3, help="images per object")
    dataset.add_argument("--seed", type=int, default=0)
    recipe = dataset.add_argument_group("SD models (SynCD's recipe)")
    recipe.add_argument(
        "--classes", default=None, help="a file of class words, one a line (without it: a built-in list of 40)"
    )
    recipe.add_argument("--steps", type=int, default=50, help="denoising steps per object")
    recipe.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    recipe.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native)")
    recipe.add_argument("--no-shared-attention", action="store_true",
                        help="generate every view alone (only to measure what sharing does)")  # fmt: skip
    dataset.set_defaults(func=run_dataset)
    train = commands.add_parser(
        "train",
        help="train the reference adapter (a LoRA on self-attention) on a dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Saves every --save-every steps; Ctrl-C stops and the same command again resumes.",
    )
    add_model_arguments(train)
    train.add_argument("--dataset", required=True, help="a folder written by `references dataset`")
    train.add_argument("--out", required=True, help="the adapter file (.safetensors)")
    train.add_argument("--steps", type=int, default=1500)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--learning-rate", type=float, default=5e-4)
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--save-every", type=int, default=100)
    train.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    train.set_defaults(func=run_train)


@contextmanager
def _interruptible():
    """Ctrl-C sets the event the engines check between two steps (and they keep what they finished)."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def run_dataset(args: argparse.Namespace) -> int:
    from engines.types import InputError
    from engines.types.checks import finite, require, whole

    if args.objects < 1 or args.views < 2:
        raise InputError("a reference dataset needs at least 1 object and 2 views of each")
    require(whole(args.seed, 0, 2**31 - 1), f"--seed must be an integer in 0..2^31-1 (got {args.seed})")
    require(whole(args.steps, 1, 1000), f"--steps must be an integer in 1..1000 (got {args.steps})")
    require(finite(args.cfg) and 0 <= args.cfg <= 50, f"--cfg must be a number in 0..50 (got {args.cfg})")
    size_ok = args.size is None or whole(args.size, 64, 4096) and args.size % 8 == 0
    require(size_ok, f"--size must be a multiple of 8 in 64..4096 (got {args.size})")
    if args.model != "demo":
        return _run_synthesis(args)
    from demo_world.reference_scenes import write_demo_dataset

    count = write_demo_dataset(args.out, args.objects, args.views, args.seed)
    print(f"{args.out}: {count} objects, {args.views} views each")
    return 0


def _run_synthesis(args: argparse.Namespace) -> int:
    from engines.models import load_model
    from engines.reference_synthesis import DEFAULT_CLASSES, SynthesisSettings, read_class_file, synthesize_dataset

    classes = read_class_file(args.classes) if args.classes else DEFAULT_CLASSES
    settings = SynthesisSettings(objects=args.objects, views=args.views, steps=args.steps, guidance=args.cfg,
                                 size=args.size, seed=args.seed, classes=classes,
                                 shared=not args.no_shared_attention)  # fmt: skip
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    bundle = load_model(replace(model_spec(args), reference_adapter="none"))
    with _interruptible() as cancel:
        count = synthesize_dataset(bundle, args.out, settings, _print_synthesis, cancel)
    print(f"{args.out}: {count} objects, {args.views} views each")
    return 0


def _print_synthesis(progress) -> None:
    """One line rewritten in place per step; a line of its own for each object written or skipped."""
    counts = f"object {progress.written + 1}/{progress.target} ({progress.skipped} skipped)"
    if progress.note:
        print(f"\r{progress.note:<{len(counts) + 40}}", file=sys.stderr, flush=True)
    else:
        line = f"{counts}  {progress.class_word}  step {progress.step}/{progress.steps}  {progress.elapsed:6.1f}s"
        print(f"\r{line:<{len(counts) + 40}}", end="", file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    from engines.models import load_model
    from engines.reference_dataset import load_dataset
    from engines.reference_training import TrainSettings, train_adapter

    _check_train_numbers(args)
    settings = TrainSettings(steps=args.steps, batch=args.batch, learning_rate=args.learning_rate, rank=args.rank,
                             save_every=args.save_every)  # fmt: skip
    dataset = load_dataset(args.dataset)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    bundle = load_model(replace(model_spec(args), reference_adapter="none"))
    with _interruptible() as cancel:
        card = train_adapter(bundle, dataset, args.out, settings, print_progress, cancel, threads=args.threads)
    print(f"{args.out}: step {card['step']}, validation loss {card.get('validation_loss')}")
    return 0


def _check_train_numbers(args: argparse.Namespace) -> None:
    """Before the dataset and the model load: a bad number would stop the training at its first step instead."""
    from engines.types.checks import finite, require, whole

    for option in ("steps", "batch", "rank", "save_every"):
        value = getattr(args, option)
        require(whole(value, 1, 1_000_000), f"--{option.replace('_', '-')} must be an integer ≥ 1 (got {value})")
    rate = args.learning_rate
    require(finite(rate) and 0 < rate <= 1, f"--learning-rate must be a number in (0, 1] (got {rate})")
    threads_ok = args.threads is None or whole(args.threads, 1, 1024)
    require(threads_ok, f"--threads must be an integer in 1..1024 (got {args.threads})")
