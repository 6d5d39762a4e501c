"""Running a job file: skip what an earlier run finished, render the rest in this process or on Ray workers, and settle
every job exactly once in the manifest (a failed attempt is tried again `retries` times before it is recorded)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engines.batch.manifest import FAILED, OK, Manifest, record
from engines.batch.render import JobOutcome, render_job, worker_name
from engines.faults import fault_point
from engines.types.batch import BatchJob, BatchOptions, BatchProgress, BatchSummary, JobFile

BatchCallback = Callable[[BatchProgress], None]


class Ledger:
    """Where every outcome goes: files in place, then one manifest line, then the progress report."""

    def __init__(self, manifest: Manifest, model: str, total: int, skipped: int, retries: int,
                 on_progress: BatchCallback | None) -> None:  # fmt: skip
        self.manifest, self.model, self.retries, self.on_progress = manifest, model, retries, on_progress
        self.total, self.skipped = total, skipped
        self.started = time.perf_counter()
        self.errors: dict[str, list[str]] = {}
        self.rendered, self.failures = 0, []

    def start(self) -> None:
        """The clock starts when the first job can run: the model load is not the jobs' time."""
        self.started = time.perf_counter()

    def settle(self, job: BatchJob, outcome: JobOutcome) -> bool:
        """Record what one attempt gave; True when the job should be tried again instead."""
        errors = self.errors.setdefault(job.key, [])
        status = OK
        if outcome.error is None:
            try:
                self.manifest.write_files(job, list(outcome.pngs))
                fault_point("batch.files.written")  # the files in place, the manifest line not yet
            except (OSError, RuntimeError) as error:  # a full disk: trying again would not help
                errors.append(f"writing the files: {error}")
                status = FAILED
        else:
            errors.append(outcome.error)
            if len(errors) <= self.retries:
                return True
            status = FAILED
        attempts = len(errors) + (status == OK)
        self.manifest.append(record(job, self.model, status, _fields(outcome), attempts, errors))
        if status == OK:
            self.rendered += 1
        else:
            self.failures.append(f"line {job.line} ({job.key[:16]}): {errors[-1]}")
        self.report()
        return False

    def report(self) -> None:
        if self.on_progress is not None:
            finished = self.rendered + len(self.failures)
            elapsed = time.perf_counter() - self.started
            self.on_progress(BatchProgress(finished, self.total, len(self.failures), elapsed, self.skipped))

    def summary(self, workers: int) -> BatchSummary:
        seconds = time.perf_counter() - self.started
        return BatchSummary(self.rendered, len(self.failures), self.skipped, seconds, workers,
                            str(self.manifest.path), tuple(self.failures))  # fmt: skip


def _fields(outcome: JobOutcome) -> dict:
    return {"seeds": outcome.seeds, "seconds": outcome.seconds, "worker": outcome.worker}


def run_batch(studio, jobs: JobFile, options: BatchOptions, on_progress: BatchCallback | None = None) -> BatchSummary:
    """Render the jobs of `jobs` that `options.out` does not hold yet. `studio` renders in-process; with
    `options.ray`, each Ray worker builds a studio of the same class and model of its own."""
    manifest = Manifest(options.out)
    records = manifest.records()
    model = studio.model_spec.source
    manifest.check_model(model, records)
    done = manifest.done(jobs.jobs, records)
    pending = [job for job in jobs.jobs if job.key not in done]
    manifest.out.mkdir(parents=True, exist_ok=True)
    manifest.clear_partial()
    ledger = Ledger(manifest, model, len(pending), len(done), options.retries, on_progress)
    if not pending:
        ledger.report()
        return ledger.summary(0)
    if options.ray is None:
        run_in_process(studio, pending, ledger)
        return ledger.summary(1)
    from engines.batch.ray_pool import run_on_ray

    workers = run_on_ray(studio, pending, ledger, options)
    return ledger.summary(workers)


def run_in_process(studio, pending: list[BatchJob], ledger: Ledger) -> None:
    """One model, loaded once by the studio, and the CLI's own generate path for every job."""
    worker = f"{worker_name()} (in-process)"
    studio.bundle  # noqa: B018 - load the model once, before the clock starts
    ledger.start()
    with tempfile.TemporaryDirectory(prefix="troupe-batch-") as scratch:
        for job in pending:
            while ledger.settle(job, render_job(studio, job, Path(scratch), worker)):
                pass
