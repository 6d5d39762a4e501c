"""The library's integrity check (`python -m studio subjects check [--repair]`): every entry that `list()` would skip,
with the reason, instead of a warning in a log nobody reads.

What counts as a problem, under the library root:
- a subject folder whose subject.json is missing, unreadable or invalid, whose residuals file is missing, unreadable
  or out of bounds, or whose listed photos, masks or thumbnail cannot be opened;
- a folder whose name is not a subject name (a foreign entry), a symbolic link, a file at the top level, and two
  folders whose names differ only in case (one folder on macOS and Windows);
- the same for learned relations under .relations/.

Repair never deletes: it moves each broken entry into <root>/.broken/<time>-<name>/, which nothing lists, and says
where (a person may still want the photos in it). Healthy entries are not touched. Transient folders (.tmp-*, .old-*,
.trash-*, .work/) belong to writes in progress and are left to the library's own sweep.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image

from engines.subject_files import THUMBNAIL
from engines.types import InputError, check_subject_name
from engines.types.checks import printable
from engines.types.subjects import LibraryProblem

BROKEN = ".broken"


def check_library(library, repair: bool = False) -> list[LibraryProblem]:
    """The problems found in `library` (an engines.library.SubjectLibrary), each moved aside when `repair`."""
    root = library.root
    if not root.exists():
        return []
    if not root.is_dir():
        raise InputError(f"the library {root} is not a folder")
    problems = [(entry, why) for entry in sorted(root.iterdir()) for why in [_subject_problem(library, entry)] if why]
    problems += _case_duplicates(root, {entry for entry, _ in problems})
    from engines.relations.library import RelationLibrary

    relations = RelationLibrary(root)
    if relations.root.is_dir():
        for entry in sorted(relations.root.iterdir()):
            why = _relation_problem(relations, entry)
            if why:
                problems.append((entry, why))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [
        LibraryProblem(
            entry=printable(str(entry.relative_to(root))),
            problem=printable(why),
            moved_to=printable(str(_move_aside(root, entry, stamp))) if repair else None,
        )
        for entry, why in problems
    ]


def _subject_problem(library, entry: Path) -> str | None:
    """Why a top-level entry of the library is not a healthy subject, or None."""
    if entry.name.startswith("."):
        return None  # transient or internal (.tmp-*, .trash-*, .work, .relations, .broken)
    if entry.is_symlink():
        return "a symbolic link: a subject's files never live outside the library"
    if not entry.is_dir():
        return "a file among the subject folders (not made by Troupe)"
    try:
        check_subject_name(entry.name)
    except InputError:
        return "a folder whose name is not a subject name (not made by Troupe)"
    try:
        meta = library._read_meta(entry)
        if meta.get("residual", True):
            library.read_residuals(entry)
    except InputError as error:
        return str(error)
    files = list(meta.get("photos", [])) + list(meta.get("masks", []))
    files += [THUMBNAIL] if (entry / THUMBNAIL).exists() else []
    for file_name in files:
        if (entry / file_name).exists() and not _image_opens(entry / file_name):
            return f"{file_name} is not a readable image"
    return None


def _image_opens(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure without decoding every pixel
        return True
    except Exception:  # Pillow raises many error types for a damaged file; any of them means "unreadable"
        return False


def _case_duplicates(root: Path, already: set[Path]) -> list[tuple[Path, str]]:
    """Subject folders whose names differ only in case: all but the first (by name) are reported."""
    seen: dict[str, Path] = {}
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry in already or not entry.is_dir():
            continue
        first = seen.setdefault(entry.name.lower(), entry)
        if first is not entry:
            found.append((entry, f"its name differs from '{first.name}' only in case (one folder on macOS/Windows)"))
    return found


def _relation_problem(relations, entry: Path) -> str | None:
    if entry.name.startswith("."):
        return None
    if entry.is_symlink() or not entry.is_dir():
        return "not a relation folder (a file or a symbolic link)"
    try:
        relations._read(entry)
    except InputError as error:
        return str(error)
    return None


def _move_aside(root: Path, entry: Path, stamp: str) -> Path:
    """Move `entry` into root/.broken/ under a new name (never over anything); returns where it went."""
    target_dir = root / BROKEN
    target_dir.mkdir(exist_ok=True)
    label = str(entry.relative_to(root)).replace(os.sep, "_").lstrip(".")
    target = target_dir / f"{stamp}-{label}"
    number = 1
    while target.exists() or target.is_symlink():
        number += 1
        target = target_dir / f"{stamp}-{label}-{number}"
    os.rename(entry, target)  # the same file system: nothing copied, nothing lost
    return target.relative_to(root)
