"""Troupe's UI (Gradio) and command line. Never imports torch: everything heavy goes through engines.service."""

from __future__ import annotations

import importlib.util
import sys

# What every command imports; looked up (not imported) before any work, so that running Troupe with a Python outside
# the project's environment is one line that says which Python to use, not an import traceback.
RUNTIME = ("torch", "diffusers", "transformers", "PIL", "numpy")


def runtime_problem(extra: tuple[str, ...] = ()) -> str | None:
    """None when this Python has Troupe's runtime, else the one line to print."""
    missing = [name for name in (*RUNTIME, *extra) if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"error: {sys.executable} has no {', '.join(missing)}: use the project's environment, "
        "`. .venv/bin/activate` or .venv/bin/python (`make demo` creates it)"
    )
