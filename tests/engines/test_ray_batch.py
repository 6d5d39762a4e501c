"""Batch rendering on a local Ray started by the test (num_cpus=2, the tiny SD 1.5): the same bytes as in-process for
mixed jobs (boxes, a subject that travels to the workers, a learned relation), a bad line reported while the rest run,
a worker killed mid-job replaced and its job retried, and a driver SIGKILLed mid-batch that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engines.batch.render import FAULT_ENV
from engines.service import Studio
from engines.types import InputError, ModelSpec
from engines.types.batch import BatchOptions
from studio.__main__ import main
from tests.engines.test_batch import (
    BAD_LINE,
    ROOT,
    add_relation,
    add_subject,
    batch_args,
    manifest_lines,
    mixed_jobs,
    one_thread,  # noqa: F401 - the same one-thread rule for the in-process side of the comparisons
    pngs,
)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def fault_marker(tmp_path_factory):
    """The workers inherit the environment of the process that starts Ray: the fault hook is armed for the whole
    module and kept inert by its marker file, which the worker-killing test removes."""
    marker = tmp_path_factory.mktemp("fault") / "marker"
    marker.write_text("armed later")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, f"exit-once:{marker}")
        yield marker


@pytest.fixture(scope="module")
def cluster(fault_marker) -> str:
    """A local Ray for this module: its address, which the CLI and a separate driver process join."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def studio(tiny_sd15_dir, tmp_path_factory) -> Studio:
    made = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path_factory.mktemp("library"))
    add_subject(made)
    add_relation(made)
    return made


def test_mixed_jobs_on_two_workers_match_the_in_process_bytes(studio, tiny_sd15_dir, cluster, tmp_path, capsys):
    jobs = mixed_jobs(tmp_path / "jobs.jsonl")
    here = studio.run_batch(studio.read_jobs(jobs), BatchOptions(str(tmp_path / "here")))
    assert here.rendered == 6
    code = main(batch_args(tiny_sd15_dir, studio, jobs, tmp_path / "ray", "--ray", cluster, "--workers", "2"))
    assert code == 1  # the bad line: reported by number, and the rest ran
    assert f"line {BAD_LINE}: steps must be an integer" in capsys.readouterr().err
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "here") and len(pngs(tmp_path / "ray")) == 6
    records = manifest_lines(tmp_path / "ray")
    assert len(records) == 6 and {r["status"] for r in records} == {"ok"}
    assert len({r["worker"] for r in records}) == 2  # both actors rendered
    assert all("in-process" not in r["worker"] for r in records)


def test_a_worker_killed_mid_job_is_replaced_and_its_job_retried(studio, cluster, fault_marker, tmp_path):
    (tmp_path / "jobs.jsonl").write_text(
        "\n".join(json.dumps({"prompt": "a photo of dog", "steps": 3, "seed": s}) for s in range(3))
    )
    fault_marker.unlink()  # armed: the first job's worker dies at its first step
    options = BatchOptions(str(tmp_path / "out"), ray=cluster, workers=1)
    summary = studio.run_batch(studio.read_jobs(tmp_path / "jobs.jsonl"), options)
    assert (summary.rendered, summary.failed) == (3, 0) and fault_marker.exists()
    records = manifest_lines(tmp_path / "out")
    retried = [r for r in records if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["errors"][0].startswith("worker lost")
    assert retried[0]["worker"] != fault_marker.read_text()  # the one actor, restarted in a new process


def test_a_driver_killed_mid_batch_resumes_on_the_cluster(studio, tiny_sd15_dir, cluster, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": "a photo of cat", "steps": 3, "seed": s}) for s in range(8)))
    whole = studio.run_batch(studio.read_jobs(jobs), BatchOptions(str(tmp_path / "whole")))
    assert whole.rendered == 8
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "studio",
        *batch_args(tiny_sd15_dir, studio, jobs, out, "--ray", cluster, "--workers", "1"),
    ]
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / "manifest.jsonl").is_file() and len((out / "manifest.jsonl").read_text().splitlines()) >= 2:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert driver.wait(60) == -signal.SIGKILL, "the driver finished before it could be killed"
    assert len(manifest_lines(out)) < 8
    assert main(batch_args(tiny_sd15_dir, studio, jobs, out, "--ray", cluster)) == 0
    assert pngs(out) == pngs(tmp_path / "whole") and len(pngs(out)) == 8
    keys = [r["key"] for r in manifest_lines(out)]
    assert len(keys) == len(set(keys)) == 8


def test_workers_that_cannot_start_are_one_line_before_any_job(cluster, tmp_path):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a photo of dog", "steps": 1}))
    studio = Studio(ModelSpec(str(tmp_path / "no-such-model")), tmp_path / "library")
    jobs = studio.read_jobs(tmp_path / "jobs.jsonl")
    with pytest.raises(InputError, match="the Ray cluster has 2 CPUs"):
        studio.run_batch(jobs, BatchOptions(str(tmp_path / "out"), ray=cluster, workers=3))
    with pytest.raises(InputError, match=r"^the Ray workers could not start: model path .* does not exist"):
        studio.run_batch(jobs, BatchOptions(str(tmp_path / "out"), ray=cluster, workers=1))
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
