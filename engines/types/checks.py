"""The vocabulary every layer uses to refuse bad input: one error type, one key check, one message per mistake.

Torch-free; engines.types re-exports these, so the UI and the CLI import them from there.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from typing import Any

# Names a Windows file system will not give a folder, whatever the case and extension ("con", "Com1.txt"): a subject
# or relation called so could be made on Linux and then never copied, synced or opened on a Windows desktop.
RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{stem}{digit}" for stem in ("com", "lpt") for digit in "123456789¹²³"}
)


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
    require(not unknown, f"{where}: unknown keys {', '.join(sorted(printable(str(k)) for k in unknown))}")
    require(not missing, f"{where}: missing keys {', '.join(sorted(missing))}")
    return data


def reserved_name(name: str) -> bool:
    """Whether `name` (before any extension) is a Windows device name: CON, PRN, AUX, NUL, COM1-9, LPT1-9."""
    return name.split(".")[0].strip().lower() in RESERVED_NAMES


def control_free(text: str) -> bool:
    """No control or format characters (ESC, newline, bidi overrides...): text that reaches a terminal or a log is
    shown as written, never able to move the cursor or recolour what follows."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in text)


def printable(text: str) -> str:
    """`text` with its control characters escaped (\\x1b, \\n): for printing names and words read from files that
    predate the checks, or that a person edited by hand."""
    return "".join(c if control_free(c) else c.encode("unicode_escape").decode("ascii") for c in text)


def unknown_subject(name: str, known: Iterable[str]) -> InputError:
    """The one message for a <name> that no registered subject has. Names are matched exactly in prompts, so a
    name that differs only in case is pointed out (subject names are unique without regard to case)."""
    known = sorted(known)
    near = [n for n in known if n.lower() == name.lower()]
    if near:
        return InputError(f"there is no subject named <{name}>: did you mean <{near[0]}>? (names are exact in prompts)")
    listed = ", ".join(f"<{n}>" for n in known) or "none yet"
    return InputError(f"there is no subject named <{name}> (registered: {listed})")
