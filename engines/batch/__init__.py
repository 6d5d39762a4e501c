"""Batch rendering: job files (JSON Lines of requests), run in this process or on Ray actors, resumable.

    jobs.py      reading, checking and expanding a job file; the request hash that names each job's files
    manifest.py  the output folder: atomic PNGs and manifest.jsonl
    render.py    one job through the studio (the CLI's generate path), and what travels with the jobs
    runner.py    skip what is done, render the rest, settle each job once (retries included)
    ray_pool.py  the Ray actors (imported only with --ray)

The studio reaches this through Studio.read_jobs and Studio.run_batch (docs/batch.md).
"""

from engines.batch.jobs import read_jobs, request_key
from engines.batch.runner import run_batch

__all__ = ["read_jobs", "request_key", "run_batch"]
