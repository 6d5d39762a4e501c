"""Fault injection: named points where a test can kill the process or raise an error, without sleeping.

    TROUPE_FAULT=library.add.written                  SIGKILL at the first time that point is reached
    TROUPE_FAULT=checkpoint.saved@2                   ... at the second time
    TROUPE_FAULT=generate.step:oom                    raise torch.OutOfMemoryError there (as CUDA would mid-step)
    TROUPE_FAULT=library.add.writing:enospc,batch.files.written

Actions: kill (SIGKILL, the default: no `finally`, no atexit, as when the OOM killer or a Space's restart strikes),
exit (os._exit(137)), oom, enospc (OSError ENOSPC, a full disk). The points and what a kill at each must leave are
listed in docs/reliability.md; tests/engines/test_kill_points.py drives every one of them in a subprocess.

Unset, a point costs one lookup in an empty dict: the variable is read once, at import. In-process tests arm points
with `armed(...)` instead of the environment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator

ACTIONS = ("kill", "exit", "oom", "enospc")


def _parse(spec: str) -> dict[str, list]:
    """ "point[@hit][:action],..." → {point: [hits left before it fires, action]}."""
    points: dict[str, list] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = item.partition(":")
        name, _, hit = where.partition("@")
        action = action or "kill"
        if action not in ACTIONS or (hit and not hit.isdigit()):
            raise ValueError(f"TROUPE_FAULT: bad entry {item!r} (point[@n][:{'|'.join(ACTIONS)}])")
        points[name] = [int(hit or 1), action]
    return points


_ARMED: dict[str, list] = _parse(os.environ.get("TROUPE_FAULT", ""))


def fault_point(name: str) -> None:
    """Fire the fault armed at `name`, if any (the hot path: one dict lookup when nothing is armed)."""
    if name in _ARMED:
        _fire(name)


def _fire(name: str) -> None:
    entry = _ARMED[name]
    entry[0] -= 1
    if entry[0] > 0:
        return
    action = entry[1]
    del _ARMED[name]  # a point fires once: the code that handles the error must be able to run on
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit":
        os._exit(137)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    import torch

    raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at {name})")


@contextlib.contextmanager
def armed(spec: str) -> Iterator[None]:
    """Arm points for the block, in this process ("generate.step:oom"); what did not fire is disarmed after."""
    added = _parse(spec)
    _ARMED.update(added)
    try:
        yield
    finally:
        for name in added:
            _ARMED.pop(name, None)


def on_steps(name: str, on_progress):
    """`on_progress` (a step callback, or None) with the point `name` before each call: a fault in the middle of a
    denoising loop. When `name` is not armed this is `on_progress` itself, so nothing changes in normal runs."""
    if name not in _ARMED:
        return on_progress

    def hook(progress) -> None:
        fault_point(name)
        if on_progress is not None:
            on_progress(progress)

    return hook
