"""Batch rendering on a local Ray started once for the module (num_cpus=2, the tiny SD 1.5): the same bytes as
in-process for mixed jobs (boxes, a subject and a LoRA file that travel to the workers, a learned relation), a bad
line reported while the rest run, a driver SIGKILLed mid-batch that resumes while a worker killed mid-job is replaced
and its job retried, and the actor options on a pretend 4-GPU cluster. Each Ray test starts as few actor processes as
its behaviour needs: every start imports torch and loads the model, which is most of these tests' time."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engines.batch import ray_pool
from engines.batch.render import FAULT_ENV, lora_copy, pack_loras
from engines.service import Studio
from engines.types import GenerateRequest, InputError, LoraRef, ModelSpec
from engines.types.batch import BatchJob, BatchOptions
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


def style_lora(studio: Studio, path: Path) -> str:
    """A person's LoRA file (peft's key format) with random weights on the cross-attention's values."""
    generator, weights = torch.Generator().manual_seed(3), {}
    for name, module in studio.bundle.pipe.unet.named_modules():
        if name.endswith("attn2.to_v"):
            weights[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.2
            weights[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    return str(path)


def test_mixed_jobs_on_two_workers_match_the_in_process_bytes(studio, tiny_sd15_dir, cluster, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    """The LoRA file is renamed on the driver as soon as it is read: a worker that looked for it at the request's
    path would fail the job; the PNGs and the manifest still name the person's path."""
    jobs = mixed_jobs(tmp_path / "jobs.jsonl")
    lora = style_lora(studio, tmp_path / "mine" / "style.safetensors")
    with jobs.open("a") as file:
        file.write(json.dumps({"prompt": "a photo of dog", "steps": 2, "seed": 3, "loras": [{"path": lora}]}) + "\n")
    here = studio.run_batch(studio.read_jobs(jobs), BatchOptions(str(tmp_path / "here")))
    assert here.rendered == 7
    plain = studio.generate(GenerateRequest("a photo of dog", steps=2, seed=3)).images[0]
    [styled] = [r["files"][0] for r in manifest_lines(tmp_path / "here") if r["request"].get("loras")]
    assert (
        Image.open(tmp_path / "here" / styled).tobytes() != plain.tobytes()
    )  # the LoRA changes the picture: a worker cannot skip it
    read = ray_pool.pack_loras

    def read_then_move(pending):
        packed = read(pending)
        Path(lora).rename(tmp_path / "moved.safetensors")
        return packed

    monkeypatch.setattr(ray_pool, "pack_loras", read_then_move)
    code = main(batch_args(tiny_sd15_dir, studio, jobs, tmp_path / "ray", "--ray", cluster, "--workers", "2"))
    assert code == 1  # the bad line: reported by number, and the rest ran
    assert f"line {BAD_LINE}: steps must be an integer" in capsys.readouterr().err
    assert not Path(lora).exists()
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "here") and len(pngs(tmp_path / "ray")) == 7
    records = manifest_lines(tmp_path / "ray")
    assert len(records) == 7 and {r["status"] for r in records} == {"ok"}
    assert len({r["worker"] for r in records}) == 2  # both actors rendered
    assert all("in-process" not in r["worker"] for r in records)
    pids = {r["worker"].rsplit(":", 1)[1] for r in records}  # each actor removed its private folder at the end
    assert not [f for pid in pids for f in Path(tempfile.gettempdir()).glob(f"troupe-worker-{pid}-*")]
    [with_lora] = [r for r in records if r["request"].get("loras")]
    assert with_lora["request"]["loras"] == [{"path": lora, "scale": 1.0}]
    assert json.loads(Image.open(tmp_path / "ray" / with_lora["files"][0]).info["troupe"])["request"]["loras"][0][
        "path"] == lora  # fmt: skip


def test_a_killed_driver_resumes_and_a_worker_killed_mid_job_is_replaced(studio, tiny_sd15_dir, cluster,
                                                                        fault_marker, tmp_path):  # fmt: skip
    """SIGKILL the driver after its first finished job; run the same command again with the fault armed, so the one
    worker dies at the first step of its first job: Ray restarts it, the job is retried, and the batch ends with every
    PNG byte for byte as in an uninterrupted run and each job once in the manifest."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": "a photo of cat", "steps": 3, "seed": s}) for s in range(4)))
    whole = studio.run_batch(studio.read_jobs(jobs), BatchOptions(str(tmp_path / "whole")))
    assert whole.rendered == 4
    out = tmp_path / "killed"
    args = batch_args(tiny_sd15_dir, studio, jobs, out, "--ray", cluster, "--workers", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").read_text().count("\n") >= 1:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert driver.wait(60) == -signal.SIGKILL, "the driver finished before it could be killed"
    done_before = len(manifest_lines(out))
    assert done_before < 4
    fault_marker.unlink()  # armed: the rerun's worker dies at its first job's first step
    assert main(args) == 0
    assert fault_marker.exists()
    assert pngs(out) == pngs(tmp_path / "whole") and len(pngs(out)) == 4
    records = manifest_lines(out)
    assert len({r["key"] for r in records}) == len(records) == 4
    retried = [r for r in records[done_before:] if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["errors"][0].startswith("worker lost")
    assert retried[0]["worker"] != fault_marker.read_text()  # the one actor, restarted in a new process


def test_workers_that_cannot_start_are_one_line_before_any_job(cluster, tmp_path):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a photo of dog", "steps": 1}))
    studio = Studio(ModelSpec(str(tmp_path / "no-such-model")), tmp_path / "library")
    jobs = studio.read_jobs(tmp_path / "jobs.jsonl")
    with pytest.raises(InputError, match="the Ray cluster has 2 CPUs"):
        studio.run_batch(jobs, BatchOptions(str(tmp_path / "out"), ray=cluster, workers=3))
    with pytest.raises(InputError, match=r"^the Ray workers could not start: model path .* does not exist"):
        studio.run_batch(jobs, BatchOptions(str(tmp_path / "out"), ray=cluster, workers=1))
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_lora_copies_are_written_once_per_content_and_keep_their_names(tmp_path):
    fetched = []

    def fetch() -> bytes:
        fetched.append(1)
        return b"weights"

    digest = hashlib.sha256(b"weights").hexdigest()
    first = lora_copy(tmp_path, "/home/me/loras/style.safetensors", digest, fetch)
    again = lora_copy(tmp_path, "/home/me/loras/style.safetensors", digest, fetch)
    renamed = lora_copy(tmp_path, "other/name.safetensors", digest, fetch)
    assert first == again and Path(first).name == "style.safetensors" and Path(renamed).name == "name.safetensors"
    assert Path(renamed).read_bytes() == b"weights" and len(fetched) == 1  # fetched and written once
    with pytest.raises(InputError, match="^LoRA x.safetensors: the bytes that reached this worker are not"):
        lora_copy(tmp_path, "x.safetensors", "0" * 64, fetch)
    (tmp_path / "kept.safetensors").write_bytes(b"weights")
    loras = (LoraRef(str(tmp_path / "kept.safetensors")), LoraRef(str(tmp_path / "gone.safetensors"), 0.5))
    job = BatchJob(1, "key", GenerateRequest("a photo of dog", seed=1, loras=loras))
    # a file removed after the up-front check is not shipped: its jobs fail on the worker, naming it; the rest run
    assert pack_loras([job, job]) == {str(tmp_path / "kept.safetensors"): (digest, b"weights")}


def test_on_a_gpu_cluster_each_actor_takes_one_gpu_and_workers_default_to_the_gpu_count(monkeypatch):
    """actor_plan on a pretend cluster of 4 GPUs and 32 CPUs (Ray's resource table, no CUDA needed): one GPU per actor
    and the model on that GPU ("cuda" inside an actor is the one GPU Ray gave it), a CPU plan when the model is pinned
    to the CPU, and more workers than GPUs refused."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 4.0, "CPU": 32.0})
    count, resources, threads = ray_pool.actor_plan(ModelSpec("demo"), None)
    assert (count, resources, threads) == (4, {"num_gpus": 1, "num_cpus": 1}, None)
    assert ray_pool.actor_plan(ModelSpec("demo"), 2)[0] == 2
    assert ray_pool.worker_spec(ModelSpec("demo", device="cuda:3"), resources).device == "cuda"
    assert ray_pool.worker_spec(ModelSpec("demo"), resources).device == "auto"
    assert ray_pool.actor_plan(ModelSpec("demo", device="cpu"), None) == (32, {"num_cpus": 1}, 1)
    with pytest.raises(InputError, match="^--workers 5: the Ray cluster has 4 GPUs, one per worker$"):
        ray_pool.actor_plan(ModelSpec("demo"), 5)
