"""Batch rendering: the jobs read from a job file, what was wrong with its lines, how a batch is run, its progress and
its outcome. Torch-free: the CLI reads and prints these; engines/batch/ makes and consumes them."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.checks import require, whole
from engines.types.generation import GenerateRequest

MAX_JOBS = 100_000  # after expansion: far beyond a storyboard or a catalogue, still not a runaway `repeat`
MAX_REPEAT = 10_000
LOCAL_RAY = "local"  # BatchOptions.ray: start a Ray on this machine (any other value is a cluster's address)


@dataclass(frozen=True)
class BatchJob:
    """One picture set to render: a request with a fixed seed, named by the hash of that request."""

    line: int  # 1-based line of the job file it came from (several jobs share a line through repeat/seeds)
    key: str  # sha256 of the request's canonical JSON: the job's identity across runs
    request: GenerateRequest  # seed always set, so a rerun makes the same pixels
    name: str | None = None  # the person's label, kept in the manifest and the file names

    @property
    def files(self) -> tuple[str, ...]:
        """The PNG file names this job writes (one per image of the request)."""
        stem = f"{self.name}-{self.key[:16]}" if self.name else self.key[:16]
        count = self.request.num_images
        return (f"{stem}.png",) if count == 1 else tuple(f"{stem}-{k + 1}.png" for k in range(count))


@dataclass(frozen=True)
class JobProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class JobFile:
    """A job file read and checked: the jobs to run, the lines refused (each with its reason) and notes (a line that
    asks for a picture another line already asks for is rendered once)."""

    path: str
    jobs: tuple[BatchJob, ...]
    problems: tuple[JobProblem, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchOptions:
    out: str  # the folder for the PNGs and manifest.jsonl
    ray: str | None = None  # None: in this process; LOCAL_RAY: a Ray started here; else a Ray cluster's address
    workers: int | None = None  # Ray actors; None: one per GPU of the cluster, else one per CPU
    retries: int = 1  # a job that fails is tried again this many times before it is recorded as failed

    def __post_init__(self) -> None:
        require(isinstance(self.out, str) and bool(self.out.strip()), "name the output folder")
        require(self.workers is None or whole(self.workers, 1, 4096), "workers must be an integer in 1..4096")
        require(whole(self.retries, 0, 10), "retries must be an integer in 0..10")
        require(self.ray is None or (isinstance(self.ray, str) and bool(self.ray)), "the Ray address is empty")


@dataclass(frozen=True)
class BatchProgress:
    """What a batch reports after each finished job: count, rate and ETA."""

    finished: int  # jobs settled in this run (rendered or failed)
    total: int  # jobs this run has to settle (the ones done in an earlier run are not counted)
    failed: int
    elapsed: float
    skipped: int = 0  # done in an earlier run

    @property
    def rate(self) -> float:
        """Jobs per second in this run."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        return (self.total - self.finished) / self.rate if self.rate > 0 else float("inf")


@dataclass(frozen=True)
class BatchSummary:
    rendered: int
    failed: int
    skipped: int
    seconds: float
    workers: int
    manifest: str  # path of manifest.jsonl
    failures: tuple[str, ...] = ()  # "line N (key): error", one per failed job
