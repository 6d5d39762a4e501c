"""python -m studio {generate,register,subjects,relations,bench,references,ui}: one module per command in studio/cli/.

Each module listed here exposes `add_parsers(subparsers)`; every subparser sets `func(args) -> exit code`.
Bad input (engines.types.InputError) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engines.types import Cancelled, InputError
from studio import runtime_problem

COMMAND_MODULES = (
    "studio.cli.generate",
    "studio.cli.register",
    "studio.cli.subjects",
    "studio.cli.bench",
    "studio.cli.references",
    "studio.cli.relations",
    "studio.cli.ui",
    "studio.cli.batch",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Troupe Studio")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := runtime_problem():
        print(problem, file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
