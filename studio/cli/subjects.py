"""python -m studio subjects {list,check,delete,rename,export,import,push,pull}: manage the subject library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines.types.checks import printable
from studio.cli.common import add_library_argument, studio_for


def add_parsers(subparsers) -> None:
    subjects = subparsers.add_parser("subjects", help="list and manage registered subjects")
    actions = subjects.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the registered subjects")
    listing.add_argument("--json", action="store_true", help="one JSON object per subject")
    listing.set_defaults(func=run_list)
    check = actions.add_parser(
        "check",
        help="find broken or foreign entries in the library",
        description="Lists every entry the library cannot use, with why; exit code 1 when there is one. --repair "
        "moves them into the library's .broken/ folder (nothing is deleted).",
    )
    check.add_argument("--repair", action="store_true", help="move broken entries aside into <library>/.broken/")
    check.set_defaults(func=run_check)
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
    for action in (listing, check, delete, rename, export, imported, push, pull):
        add_library_argument(action)


def run_list(args: argparse.Namespace) -> int:
    subjects = studio_for(args, with_model=False).subjects()
    if subjects and not args.json:
        print(f"{'NAME':<20} {'CLASS':<16} {'FAMILY':<6} {'HOLDS':<17} CREATED")
    for info in subjects:
        if args.json:
            print(
                json.dumps(
                    {
                        "name": info.name,
                        "class_word": info.class_word,
                        "family": info.family,
                        "fingerprint": info.fingerprint,
                        "created": info.created,
                        "steps": info.steps,
                        "holds": info.holds,
                    }
                )
            )
        else:
            # class words come from files (imports, hand edits): escaped, a terminal never runs what they hold
            word, created = printable(info.class_word), printable(info.created[:19])
            print(f"{info.name:<20} {word:<16} {info.family:<6} {info.holds:<17} {created}")
    if not subjects and not args.json:
        print("no subjects registered yet", file=sys.stderr)
    return 0


def run_check(args: argparse.Namespace) -> int:
    studio = studio_for(args, with_model=False)
    problems = studio.check_library(repair=args.repair)
    for problem in problems:
        moved = f"  → moved to {problem.moved_to}" if problem.moved_to else ""
        print(f"{problem.entry}: {problem.problem}{moved}")
    if not problems:
        print(f"{studio.library_dir}: no problems found", file=sys.stderr)
    elif not args.repair:
        print(f"{len(problems)} problem(s); --repair moves them into .broken/", file=sys.stderr)
    return 1 if problems and not args.repair else 0


def run_delete(args: argparse.Namespace) -> int:
    studio_for(args, with_model=False).delete_subject(args.name)
    print(f"deleted {args.name}")
    return 0


def run_rename(args: argparse.Namespace) -> int:
    info = studio_for(args, with_model=False).rename_subject(args.old, args.new)
    print(f"renamed {args.old} → {info.name}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    studio = studio_for(args, with_model=False)
    path = studio.export_subject(args.name, Path(args.dest), include_photos=not args.no_photos)
    print(path)
    return 0


def run_import(args: argparse.Namespace) -> int:
    info = studio_for(args, with_model=False).import_subject(args.file, args.name)
    print(f"imported <{info.name}> ({printable(info.class_word)}, {info.family})")
    return 0


def run_push(args: argparse.Namespace) -> int:
    path = studio_for(args, with_model=False).push_subject(args.name, args.repo_id, token=args.token)
    print(f"uploaded {args.name} to {args.repo_id}/{path}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    info = studio_for(args, with_model=False).pull_subject(
        args.repo_id, args.filename, name=args.name, token=args.token
    )
    print(f"pulled <{info.name}> ({printable(info.class_word)}, {info.family})")
    return 0
