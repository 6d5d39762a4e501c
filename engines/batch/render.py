"""Rendering one job, the same way in this process and on a Ray worker, and what travels with the jobs.

A job goes through Studio.generate and Studio.save_png, exactly as `python -m studio generate` does, and comes back
as PNG bytes: the driver writes every file, so a worker on another machine needs no shared folder, and the bytes of a
picture do not depend on where it was made.

Subjects and learned relations travel as the single-file exports of their libraries (a few KB of residuals plus the
photos and masks; a relation's LoRA): a worker imports them into a private library of its own. The LoRA files that
requests name travel as bytes with the jobs that use them: a worker writes each into a private folder once, under its
sha256, and reads it from there, while the request (and so the PNG and the job's hash) keeps the person's path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engines.prompts import SUBJECT_PATTERN
from engines.types import GenerateRequest, InputError, StepProgress
from engines.types.batch import BatchJob

FAULT_ENV = "TROUPE_BATCH_FAULT"  # tests only: "exit-once:PATH" or "raise-once:PATH" (see _fault_hook)


@dataclass(frozen=True)
class JobOutcome:
    key: str
    pngs: tuple[bytes, ...] = ()
    seeds: tuple[int, ...] = ()
    seconds: float = 0.0
    worker: str = ""
    error: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def render_job(studio, job: BatchJob, scratch: Path, worker: str | None = None) -> JobOutcome:
    """One job through the studio; any failure becomes the outcome's error (one job never stops a batch)."""
    worker = worker or worker_name()
    started = time.perf_counter()
    try:
        result = studio.generate(job.request, on_progress=_fault_hook())
        pngs = tuple(png_bytes(studio, image, scratch) for image in result.images)
    except Exception as error:  # noqa: BLE001 - recorded in the manifest and retried, whatever it was
        message = str(error) if isinstance(error, InputError) else _short_trace(error)
        return JobOutcome(job.key, seconds=time.perf_counter() - started, worker=worker, error=message)
    return JobOutcome(job.key, pngs, tuple(result.seeds), time.perf_counter() - started, worker,
                      warnings=tuple(result.warnings))  # fmt: skip


def png_bytes(studio, image, scratch: Path) -> bytes:
    """The file Studio.save_png writes (the CLI's generate writes the same), as bytes."""
    path = Path(tempfile.mkstemp(suffix=".png", dir=scratch)[1])
    try:
        studio.save_png(image, path)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def _short_trace(error: BaseException) -> str:
    """The error and the line that raised it: enough to find a bug from the manifest, short enough to read."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _fault_hook():
    """A test's way to kill a worker (or fail a job) in the middle of a job, once: the first job to reach its first
    step creates the marker file, writes its worker's name there and dies (or raises). Unset in normal use, when this returns None."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, marker = spec.partition(":")
    if kind not in ("exit-once", "raise-once") or not marker:
        return None

    def hook(progress: StepProgress) -> None:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, worker_name().encode())  # who failed: the test checks that another process finished the job
        os.close(fd)
        if kind == "exit-once":
            os._exit(17)
        raise RuntimeError("injected fault")

    return hook


# What travels with the jobs ------------------------------------------------------------------------------------------
def named_subjects(requests: Iterable[GenerateRequest]) -> set[str]:
    names = set()
    for request in requests:
        names |= {m.group(1) for m in SUBJECT_PATTERN.finditer(request.prompt)}
        names |= {r.subject for r in request.layout.regions if r.subject}
    return names


def check_request(studio):
    """The up-front check of a job against this studio's libraries (no model needed): every subject it names is
    registered, its relation exists and its LoRA files are there. The model-dependent checks (a residual trained on
    another model, say) fail the job when it runs, and the manifest records why."""
    subjects = set(studio.library.names())
    relations = set(studio.relations())

    def check(request: GenerateRequest) -> None:
        missing = sorted(named_subjects([request]) - subjects)
        if missing:
            listed = ", ".join(f"<{n}>" for n in sorted(subjects)) or "none yet"
            raise InputError(f"there is no subject named <{missing[0]}> (registered: {listed})")
        if request.relation and request.relation not in relations:
            raise InputError(f"unknown relation '{request.relation}' (known: {', '.join(sorted(relations))})")
        for lora in request.loras:
            if not Path(lora.path).expanduser().is_file():
                raise InputError(f"LoRA {lora.path}: no such file")

    return check


def pack_library(studio, jobs: Iterable[BatchJob], scratch: Path) -> dict[str, dict[str, bytes]]:
    """The exports of every subject and learned relation the jobs use, as bytes (what a worker imports)."""
    jobs = list(jobs)
    learned = {info.name for info in studio.learned_relations()}
    payload: dict[str, dict[str, bytes]] = {"subjects": {}, "relations": {}}
    for name in sorted(named_subjects(job.request for job in jobs)):
        payload["subjects"][name] = studio.export_subject(name, scratch / f"s-{name}.safetensors").read_bytes()
    for name in sorted({job.request.relation for job in jobs if job.request.relation} & learned):
        path = studio.export_relation(name, scratch / f"r-{len(payload['relations'])}.safetensors")
        payload["relations"][name] = path.read_bytes()
    return payload


def unpack_library(studio, payload: dict[str, dict[str, bytes]], scratch: Path) -> None:
    """Import what pack_library packed into this (private, empty) studio library."""
    for kind, items in payload.items():
        for index, (name, data) in enumerate(sorted(items.items())):
            path = scratch / f"in-{kind}-{index}.safetensors"
            path.write_bytes(data)
            if kind == "subjects":
                studio.import_subject(path, name)
            else:
                studio.import_relation(path, name)
            path.unlink()


def pack_loras(jobs: Iterable[BatchJob]) -> dict[str, tuple[str, bytes]]:
    """The LoRA files the jobs name, read here once: the path as the request writes it → (sha256, the file's bytes)."""
    packed = {}
    for path in sorted({lora.path for job in jobs for lora in job.request.loras}):
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError:  # gone since the job file was checked: its jobs fail on the worker, naming it, and the rest run
            continue
        packed[path] = (hashlib.sha256(data).hexdigest(), data)
    return packed


def lora_copy(folder: Path, path: str, digest: str, fetch: Callable[[], bytes]) -> str:
    """A worker's copy of the LoRA file a request names as `path`, written once per content (`fetch` gives the bytes
    only when it is not written yet). It keeps the file's name, so a LoRA's errors name the person's file."""
    home = folder / digest
    target = home / Path(path).name
    if target.is_file():
        return str(target)
    home.mkdir(parents=True, exist_ok=True)
    known = next((f for f in home.iterdir() if not f.name.startswith(".")), None)
    if known is not None:  # the same bytes under another name: a link, not a second copy
        try:
            os.link(known, target)
            return str(target)
        except OSError:  # a file system without hard links: write it again
            pass
    data = fetch()
    if hashlib.sha256(data).hexdigest() != digest:
        raise InputError(f"LoRA {Path(path).name}: the bytes that reached this worker are not the driver's file")
    temp = home / f".{target.name}.tmp"
    temp.write_bytes(data)
    os.replace(temp, target)  # a worker killed mid-write leaves no half file under the name it reads
    return str(target)
