"""Job files: JSON Lines, one request per line, read and checked before anything renders.

A line is either the `request` object of a Troupe PNG's `troupe` chunk (GenerateRequest.to_dict) or that whole chunk
({"version", "request", "model"}), so the settings of any Troupe PNG can be pasted as a job. Either form may add:

    name    a label for the files and the manifest (letters, digits, '_', '-', '.')
    repeat  render the request N times, seeds seed, seed + n, seed + 2n, ... (n = num_images)
    seeds   render it once per listed seed

A request without a seed gets one derived from its own content (and its repeat index), so a rerun makes the same
pictures and finds its finished jobs: a batch that drew random seeds could never resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.types import GenerateRequest, InputError, ReferenceConfig
from engines.types.batch import MAX_JOBS, MAX_REPEAT, BatchJob, JobFile, JobProblem

EXTRA_KEYS = ("name", "repeat", "seeds")
CHUNK_KEYS = ("version", "request", "model")
CHUNK_VERSIONS = (1, 2)  # engines/metadata.py's FORMAT_VERSION history: 1 = made before references existed
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_MISSING = object()
MAX_LINE = 1_000_000  # characters: a request is a few KB; a megabyte line is a mistake, not a job

Check = Callable[[GenerateRequest], None]  # raises InputError for a request this studio cannot render


def request_key(request: GenerateRequest) -> str:
    """sha256 of the request's canonical JSON: equal requests (same seed) are the same picture. Fields at their
    defaults are left out, so a field that a later Troupe adds (with a default) does not rename every finished job."""
    data = _changed(request.to_dict(), GenerateRequest(prompt=request.prompt).to_dict())
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _changed(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` whose values differ from `defaults` (nested objects compared key by key)."""
    out = {}
    for key, value in data.items():
        default = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            value = _changed(value, default)
            if value:
                out[key] = value
        elif value != default or key == "prompt":
            out[key] = value
    return out


def derived_seed(request: GenerateRequest, index: int) -> int:
    """A seed taken from the request itself, for jobs that leave it out (stable across runs and machines)."""
    digest = hashlib.sha256(f"{request_key(request)}#{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def read_jobs(path: str | Path, check: Check | None = None) -> JobFile:
    """Every line parsed, validated and expanded. A bad line becomes a JobProblem with its number; the good ones are
    still returned, so the caller can report all problems at once and decide whether to run the rest."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"job file {path} is unreadable ({error})") from None
    jobs: dict[str, BatchJob] = {}
    problems, notes = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # blank lines and comments let people annotate a job file
        try:
            expanded = parse_line(line, number)
            for job in expanded:
                if check is not None:
                    check(job.request)
        except InputError as error:
            problems.append(JobProblem(number, str(error)))
            continue
        for job in expanded:
            if job.key in jobs:
                notes.append(f"line {number} asks for the picture of line {jobs[job.key].line}: rendered once")
                continue
            jobs[job.key] = job
        if len(jobs) > MAX_JOBS:
            raise InputError(f"job file {path.name}: more than {MAX_JOBS} jobs (split it into several files)")
    if not jobs and not problems:
        raise InputError(f"job file {path.name} holds no jobs")
    return JobFile(str(path), tuple(jobs.values()), tuple(problems), tuple(dict.fromkeys(notes)))


def parse_line(line: str, number: int) -> list[BatchJob]:
    """One line of a job file → its jobs (InputError for anything wrong with it)."""
    if len(line) > MAX_LINE:
        raise InputError(f"the line is longer than {MAX_LINE} characters")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise InputError("not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InputError("a job is a JSON object (a request, or a Troupe PNG's settings)")
    extras = {key: data.pop(key) for key in EXTRA_KEYS if key in data}
    request = _request_of(data)
    name = _name(extras.get("name"))
    return [BatchJob(number, request_key(r), r, name) for r in expand(request, extras)]


def _request_of(data: dict[str, Any]) -> GenerateRequest:
    if "request" in data:  # a whole `troupe` chunk, as a PNG carries it
        unknown = set(data) - set(CHUNK_KEYS)
        if unknown:
            raise InputError(f"unknown keys {', '.join(sorted(unknown))} beside 'request'")
        version = data.get("version", CHUNK_VERSIONS[-1])
        if version not in CHUNK_VERSIONS:
            raise InputError(f"settings version {version!r} is not one this Troupe reads ({CHUNK_VERSIONS})")
        request = _from_dict(data["request"])
        if version == 1:  # as engines/metadata.read_request: an image made before references must not gain them
            request = dataclasses.replace(request, references=ReferenceConfig(enabled=False))
        return request
    return _from_dict(data)


def _from_dict(data: Any) -> GenerateRequest:
    try:
        return GenerateRequest.from_dict(data)
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError) as error:  # a list where a number belongs, and the like
        raise InputError(f"a field has the wrong type ({error})") from None


def _name(value: Any) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, str) and 1 <= len(value) <= 80 and set(value) <= NAME_CHARS and not value.startswith(".")
    if not ok:
        raise InputError(f"name {value!r}: use 1–80 letters, digits, '_', '-' or '.' (it becomes part of file names)")
    return value


def expand(request: GenerateRequest, extras: dict[str, Any]) -> list[GenerateRequest]:
    """`seeds` and `repeat` → one request per picture set, each with its seed fixed."""
    seeds, repeat = extras.get("seeds"), extras.get("repeat", 1)
    if seeds is not None and "repeat" in extras:
        raise InputError("give either 'seeds' or 'repeat', not both")
    if seeds is not None:
        ok = isinstance(seeds, list) and 1 <= len(seeds) <= MAX_REPEAT
        ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds)
        if not ok:
            raise InputError(f"seeds must be a list of 1..{MAX_REPEAT} integers ≥ 0")
        if request.seed is not None:
            raise InputError("give either 'seed' or 'seeds', not both")
        return [dataclasses.replace(request, seed=s) for s in seeds]
    if not (isinstance(repeat, int) and not isinstance(repeat, bool) and 1 <= repeat <= MAX_REPEAT):
        raise InputError(f"repeat must be an integer in 1..{MAX_REPEAT}")
    base = request.seed if request.seed is not None else derived_seed(request, 0)
    step = request.num_images  # a request of n images uses seeds base..base+n-1 (engines/generate.py)
    if base + step * repeat >= 2**63:
        raise InputError("the seeds of this repeat run past 2^63")
    return [dataclasses.replace(request, seed=base + k * step) for k in range(repeat)]
