"""python -m studio batch JOBS.jsonl --out DIR: render a job file in this process or on Ray, resumably.

Every line is checked before anything renders; bad lines are listed by number and the rest still run (exit code 1
at the end, so a script notices), unless --strict. `--check` only reads and checks the file.
"""

from __future__ import annotations

import argparse
import sys

from engines.types import InputError
from engines.types.batch import LOCAL_RAY, BatchOptions, BatchProgress
from studio.cli.common import add_library_argument, add_model_arguments, studio_for


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="render a job file (JSON Lines of requests), resumably, in this process or on Ray",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("jobs", help="a .jsonl file: one request per line (a Troupe PNG's settings), see docs/batch.md")
    parser.add_argument("--out", required=True, help="the folder for the PNGs and manifest.jsonl (a rerun resumes)")
    add_model_arguments(parser)
    add_library_argument(parser)
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        default=None,
        metavar="ADDRESS",
        help="render on Ray actors: alone, start a Ray on this machine; with an address (or 'auto'), join that cluster",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray actors (default: one per GPU of the cluster, else one per CPU)"
    )
    parser.add_argument("--retries", type=int, default=1, help="tries again for a job that fails")
    parser.add_argument("--strict", action="store_true", help="render nothing if any line of the file is bad")
    parser.add_argument("--check", action="store_true", help="only read and check the job file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.ray is None:
        raise InputError("--workers sets the number of Ray actors: add --ray (or --ray ADDRESS)")
    options = BatchOptions(args.out, ray=args.ray, workers=args.workers, retries=args.retries)
    studio = studio_for(args)
    jobs = studio.read_jobs(args.jobs)
    for problem in jobs.problems:
        print(f"{args.jobs}: {problem}", file=sys.stderr)
    for note in jobs.notes:
        print(f"{args.jobs}: note: {note}", file=sys.stderr)
    bad = f", {len(jobs.problems)} bad line(s)" if jobs.problems else ""
    print(f"{len(jobs.jobs)} job(s){bad}", file=sys.stderr)
    if args.check or (args.strict and jobs.problems):
        return 1 if jobs.problems else 0
    where = "in this process" if args.ray is None else f"on Ray ({args.ray})"
    print(f"loading {args.model}, rendering {where} ...", file=sys.stderr, flush=True)
    summary = studio.run_batch(jobs, options, on_progress=print_batch_progress)
    for failure in summary.failures:
        print(f"failed: {failure}", file=sys.stderr)
    rate = summary.rendered / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.rendered} rendered, {summary.skipped} already done, {summary.failed} failed in "
        f"{summary.seconds:.1f}s ({rate:.2f} jobs/s, {summary.workers} worker(s)); manifest {summary.manifest}",
        file=sys.stderr,
    )
    return 1 if summary.failed or jobs.problems else 0


def print_batch_progress(progress: BatchProgress) -> None:
    """One line on stderr, rewritten in place: `job 12/40  0.85 jobs/s  eta 33s  (1 failed, 8 done before)`."""
    end = "\n" if progress.finished == progress.total else "\r"
    eta = f"{progress.eta:5.0f}s" if progress.eta != float("inf") else "    ?"
    notes = []
    if progress.failed:
        notes.append(f"{progress.failed} failed")
    if progress.skipped:
        notes.append(f"{progress.skipped} done before")
    extra = f"  ({', '.join(notes)})" if notes else ""
    print(
        f"job {progress.finished}/{progress.total}  {progress.rate:.2f} jobs/s  eta {eta}{extra} ",
        end=end,
        file=sys.stderr,
        flush=True,
    )
