"""Library folders that appear whole or not at all, whatever moment the process is killed at.

A subject or relation is built in `<root>/.tmp-*` and renamed into place. Replacing one takes two renames (the old
folder aside as `.old-<name>-<id>`, the new one in), and a kill between them would leave neither under the name, so
`sweep` puts an `.old-` folder back when nothing took its place. Removing one renames it to `.trash-<name>-<id>` first
(one atomic step), then deletes it: a kill mid-delete leaves only a hidden `.trash-` folder, which `sweep` removes.
Every step has a fault point (engines/faults.py) named `<point>.<step>`, so tests kill the process at each.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path

from engines.faults import fault_point
from engines.subject_files import fsync
from engines.types import InputError


def place_folder(temp: Path, target: Path, point: str) -> None:
    """Move the finished folder `temp` to `target` (same parent), replacing what is there."""
    for path in temp.iterdir():
        fsync(path)
    fault_point(f"{point}.written")  # the new folder is complete under its temporary name
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        fault_point(f"{point}.swapped")  # the old folder aside, the new one not in yet: sweep() puts it back
    os.rename(temp, target)
    fsync(target.parent)
    fault_point(f"{point}.placed")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Make `folder` disappear in one step, then delete it."""
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    fault_point("library.remove.moved")
    shutil.rmtree(trash, ignore_errors=True)


def sweep(root: Path, stale_seconds: float = 24 * 3600) -> None:
    """Finish what killed writes left in `root`: an `.old-` folder whose name is free again comes back (the write
    never finished), other `.old-` and all `.trash-` folders go, and `.tmp-` folders go once a day old (a write in
    another process may still be building one)."""
    if not root.is_dir():
        return
    now = time.time()
    for path in root.iterdir():
        name = path.name
        if name.startswith(".old-"):
            live = root / name[len(".old-") :].rsplit("-", 1)[0]
            if not live.exists():
                os.rename(path, live)
                continue
        if name.startswith((".old-", ".trash-")) or (name.startswith(".tmp-") and now - _mtime(path) > stale_seconds):
            shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_error(what: str, error: OSError) -> InputError:
    """One line for a write that failed (a full disk, no permission); the caller has already undone the write."""
    reason = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return InputError(f"cannot save {what}: {reason} — nothing was changed")
