"""The vocabulary every layer uses to refuse bad input: one error type, one key check, one message per mistake.

Torch-free; engines.types re-exports these, so the UI and the CLI import them from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class InputError(ValueError):
    """Bad input from a person (a box outside the canvas, an unknown subject...): shown as one readable line."""


class Cancelled(Exception):
    """The person pressed cancel; whatever was running stopped between two steps and changed nothing."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_keys(data: Any, where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """The one unknown-key check of every JSON Troupe reads: a typo never silently changes a picture."""
    require(isinstance(data, dict), f"{where} must be a JSON object")
    unknown, missing = set(data) - set(allowed), set(required) - set(data)
    require(not unknown, f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    require(not missing, f"{where}: missing keys {', '.join(sorted(missing))}")
    return data


def unknown_subject(name: str, known: Iterable[str]) -> InputError:
    """The one message for a <name> that no registered subject has."""
    listed = ", ".join(f"<{n}>" for n in sorted(known)) or "none yet"
    return InputError(f"there is no subject named <{name}> (registered: {listed})")
