"""The output folder of a batch: PNGs written atomically, and manifest.jsonl, one line per settled job.

A PNG is written under a temporary name, synced and renamed into place, so a killed driver never leaves half a file
under a final name. A manifest line is appended only after the job's files are in place, and flushed and synced, so
a job the manifest calls "ok" has its files. A driver killed between the rename and the append leaves a finished
file without its line: the rerun renders that job again, which rewrites the same bytes (the seed is fixed) and adds
its one line. A line cut short by a kill is ignored when read and closed off before the next append.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.faults import fault_point
from engines.types import InputError
from engines.types.batch import BatchJob

MANIFEST = "manifest.jsonl"
OK, FAILED = "ok", "failed"


def write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        fault_point("batch.file.written")  # the PNG whole under its temporary name
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class Manifest:
    """manifest.jsonl in the output folder: which jobs are done, and appending what each job did."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).expanduser()
        self.path = self.out / MANIFEST

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        found = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the tail of a driver killed mid-append
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                found.append(record)
        return found

    def check_model(self, model: str, records: Iterable[dict[str, Any]]) -> None:
        """One folder holds one model's pictures: a request's hash does not name the model it was rendered with."""
        others = {r.get("model") for r in records} - {model}
        if others:
            raise InputError(f"{self.out} holds pictures of model {sorted(map(str, others))[0]}, not {model}: "
                             "write this batch to another --out folder")  # fmt: skip

    def done(self, jobs: Iterable[BatchJob], records: list[dict[str, Any]]) -> set[str]:
        """The keys of jobs a previous run finished: an "ok" line and every one of its files on disk."""
        ok = {r["key"] for r in records if r.get("status") == OK}
        return {job.key for job in jobs if job.key in ok and all((self.out / f).is_file() for f in job.files)}

    def clear_partial(self) -> None:
        """Remove the temporary files of a driver killed mid-write (never a finished PNG: those have final names)."""
        for path in self.out.glob(".*.tmp") if self.out.is_dir() else ():
            path.unlink(missing_ok=True)

    def write_files(self, job: BatchJob, pngs: list[bytes]) -> None:
        if len(pngs) != len(job.files):
            raise RuntimeError(f"job {job.key[:16]} made {len(pngs)} images, not {len(job.files)}")
        for name, data in zip(job.files, pngs):
            write_atomic(self.out / name, data)

    def append(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
        with open(self.path, "a+b") as file:
            if file.tell() > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":  # a previous driver died mid-line: end that line first
                    line = "\n" + line
            data = line.encode("utf-8")
            file.write(data[: len(data) // 2])
            file.flush()
            fault_point("batch.manifest.half")  # a line cut short, as a kill mid-write leaves one
            file.write(data[len(data) // 2 :])
            file.flush()
            os.fsync(file.fileno())


def record(job: BatchJob, model: str, status: str, outcome: dict[str, Any], attempts: int,
           errors: list[str]) -> dict[str, Any]:  # fmt: skip
    """One manifest line: the job, where its files are, how long it took, on which worker and what went wrong."""
    return {
        "key": job.key,
        "line": job.line,
        "name": job.name,
        "status": status,
        "files": list(job.files) if status == OK else [],
        "seeds": list(outcome.get("seeds", [])),
        "seconds": round(float(outcome.get("seconds", 0.0)), 3),
        "worker": outcome.get("worker"),
        "attempts": attempts,
        "errors": errors,
        "model": model,
        "request": job.request.to_dict(),
    }
