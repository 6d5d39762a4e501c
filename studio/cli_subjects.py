"""python -m studio register / subjects {list,delete,rename,export,import,push,pull}.

Never imports torch at module import: engines.service is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from engines.types import DTYPES, OFFLOADS, PRESETS, QUANTIZATIONS, ModelSpec, RegisterRequest, StepProgress


def add_parsers(subparsers) -> None:
    register = subparsers.add_parser(
        "register", help="register a subject from 1–10 photos (Cones 2 residual embedding)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Ctrl-C stops between two steps and keeps a checkpoint: the same command again resumes.")
    add_model_arguments(register)
    register.add_argument("--name", required=True, help="the subject's name: use it as <name> in prompts")
    register.add_argument("--class", dest="class_word", required=True, help="what it is: dog, mug, toy, ...")
    register.add_argument("photos", nargs="+", help="1–10 photos (PNG, JPEG or WebP)")
    register.add_argument("--preset", choices=PRESETS, default="standard")
    register.add_argument("--no-masks", action="store_true", help="do not weight the loss by the foreground mask")
    register.add_argument("--seed", type=int, default=0)
    _library_argument(register)
    register.set_defaults(func=run_register)

    subjects = subparsers.add_parser("subjects", help="list and manage registered subjects")
    actions = subjects.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the registered subjects")
    listing.add_argument("--json", action="store_true", help="one JSON object per subject")
    listing.set_defaults(func=run_list)
    delete = actions.add_parser("delete", help="delete a subject")
    delete.add_argument("name")
    delete.set_defaults(func=run_delete)
    rename = actions.add_parser("rename", help="rename a subject")
    rename.add_argument("old")
    rename.add_argument("new")
    rename.set_defaults(func=run_rename)
    export = actions.add_parser("export", help="write a subject to one .safetensors file")
    export.add_argument("name")
    export.add_argument("dest", help="a .safetensors path or a folder")
    export.add_argument("--no-photos", action="store_true", help="residuals, metadata and thumbnail only")
    export.set_defaults(func=run_export)
    imported = actions.add_parser("import", help="add a subject from a .safetensors file exported by Troupe")
    imported.add_argument("file")
    imported.add_argument("--name", default=None, help="register it under another name")
    imported.set_defaults(func=run_import)
    push = actions.add_parser("push", help="upload a subject to a Hugging Face Hub repo")
    push.add_argument("name")
    push.add_argument("repo_id")
    push.add_argument("--token", default=None)
    push.set_defaults(func=run_push)
    pull = actions.add_parser("pull", help="download a subject from a Hugging Face Hub repo")
    pull.add_argument("repo_id")
    pull.add_argument("filename")
    pull.add_argument("--name", default=None)
    pull.add_argument("--token", default=None)
    pull.set_defaults(func=run_pull)
    for action in (listing, delete, rename, export, imported, push, pull):
        _library_argument(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The same model options as `generate` (kept here so this module stands on its own)."""
    parser.add_argument("--model", default="demo", help="demo, a Hub id, a diffusers folder or a .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="registration trains a copy of the text encoder, so it must stay unquantized")
    parser.add_argument("--offload", choices=OFFLOADS, default="none")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model, dtype=args.dtype, quantization=args.quantization, offload=args.offload,
                     device=args.device)


def _library_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--library", default=None, help="subject library folder (default ~/.troupe/library)")


def _studio(args: argparse.Namespace, with_model: bool = False):
    from engines.service import Studio

    return Studio(model_spec(args) if with_model else None, args.library)


def print_progress(progress: StepProgress) -> None:
    end = "\n" if progress.step == progress.total else "\r"
    loss = f"  loss {progress.loss:.4f}" if progress.loss is not None else ""
    print(f"step {progress.step}/{progress.total}{loss}  {progress.elapsed:5.1f}s  eta {progress.eta:5.1f}s ",
          end=end, file=sys.stderr, flush=True)


def run_register(args: argparse.Namespace) -> int:
    request = RegisterRequest(name=args.name, class_word=args.class_word, photos=tuple(args.photos),
                              preset=args.preset, use_masks=not args.no_masks, seed=args.seed)
    studio = _studio(args, with_model=True)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # stop between steps, keep a checkpoint
    try:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        info = studio.register(request, on_progress=print_progress, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"registered <{info.name}> ({info.class_word}, {info.family}, {info.steps} steps)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    subjects = _studio(args).subjects()
    for info in subjects:
        if args.json:
            print(json.dumps({"name": info.name, "class_word": info.class_word, "family": info.family,
                              "fingerprint": info.fingerprint, "created": info.created, "steps": info.steps}))
        else:
            print(f"{info.name:<20} {info.class_word:<16} {info.family:<6} {info.created[:19]}")
    if not subjects and not args.json:
        print("no subjects registered yet", file=sys.stderr)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    _studio(args).delete_subject(args.name)
    print(f"deleted {args.name}")
    return 0


def run_rename(args: argparse.Namespace) -> int:
    info = _studio(args).rename_subject(args.old, args.new)
    print(f"renamed {args.old} → {info.name}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    studio = _studio(args)
    path = studio.export_subject(args.name, Path(args.dest), include_photos=not args.no_photos)
    print(path)
    return 0


def run_import(args: argparse.Namespace) -> int:
    info = _studio(args).import_subject(args.file, args.name)
    print(f"imported <{info.name}> ({info.class_word}, {info.family})")
    return 0


def run_push(args: argparse.Namespace) -> int:
    path = _studio(args).push_subject(args.name, args.repo_id, token=args.token)
    print(f"uploaded {args.name} to {args.repo_id}/{path}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    info = _studio(args).pull_subject(args.repo_id, args.filename, name=args.name, token=args.token)
    print(f"pulled <{info.name}> ({info.class_word}, {info.family})")
    return 0
