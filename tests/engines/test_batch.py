"""Batch rendering in this process: job files checked line by line, the CLI's own pixels and bytes, outputs named by the
request's hash, one manifest line per job, a failed job retried once, and a SIGKILLed driver that resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from engines.batch import read_jobs, request_key
from engines.batch.manifest import MANIFEST
from engines.batch.render import FAULT_ENV
from engines.service import Studio
from engines.types import GenerateRequest, InputError, Layout, ModelSpec, Region, RelationInfo, SubjectInfo
from engines.types.batch import BatchOptions
from studio.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
BAD_LINE = 4  # of mixed_jobs(): steps as a word


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as a batch worker has: on a shared 2-core machine, two threads fight and run 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studio(tiny_sd15_dir, tmp_path_factory) -> Studio:
    """A studio over the tiny SD 1.5 with a subject <rex> (a residual and a photo) and a learned relation."""
    made = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path_factory.mktemp("library"))
    add_subject(made)
    add_relation(made)
    return made


def add_subject(studio: Studio, name: str = "rex", fingerprint: str | None = None) -> None:
    torch.manual_seed(1)
    info = SubjectInfo(name, "dog", "sd15", fingerprint or studio.bundle.fingerprint, "2026-01-01T00:00:00+00:00", 1)
    photo = Image.new("RGB", (32, 32), (200, 40, 40))
    studio.library.add(info, {"text_encoder": torch.randn(1, 32) * 0.5}, [photo], [Image.new("L", (32, 32), 255)])


def add_relation(studio: Studio, name: str = "test-lean") -> None:
    """A learned relation made by hand: random LoRA weights on the cross-attention's keys and values."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for module_name, module in studio.bundle.pipe.unet.named_modules():
        if module_name.endswith(("attn2.to_k", "attn2.to_v")):
            weights[f"{module_name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
            weights[f"{module_name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    boxes = ((0.05, 0.2, 0.5, 0.9), (0.45, 0.2, 0.95, 0.9))
    info = RelationInfo(name, "leaning on", "{a} leaning on {b}", boxes, (0, 1), "sd15", studio.bundle.fingerprint,
                        "2026-01-01T00:00:00+00:00", 1, 2, 0.0, 3, 0.0, "")  # fmt: skip
    studio.relation_library.add(info, weights)


def mixed_jobs(path: Path) -> Path:
    """Plain, boxes, a subject (repeated), a learned relation; line 4 has a bad field."""
    boxes = {"regions": [{"phrase": "dog", "box": [0.0, 0.1, 0.5, 0.9]}, {"phrase": "cat", "box": [0.5, 0.1, 1, 0.9]}]}
    lines = [
        {"prompt": "a photo of dog and cat", "steps": 2, "seed": 1},
        {"prompt": "a photo of dog and cat", "steps": 2, "seed": 2, "layout": boxes, "name": "boxes"},
        {
            "prompt": "a photo of <rex>",
            "steps": 2,
            "repeat": 2,
            "seed": 5,
            "layout": {"regions": [{"phrase": "", "subject": "rex", "box": [0.2, 0.2, 0.8, 0.8]}]},
        },  # fmt: skip
        {"prompt": "a photo of dog", "steps": "many"},
        {"prompt": "dog leaning on cat", "steps": 2, "relation": "test-lean", "seeds": [7, 8]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def batch_args(tiny_sd15_dir, studio: Studio, jobs: Path, out: Path, *extra: str) -> list[str]:
    model = ["--model", str(tiny_sd15_dir), "--library", str(studio.library_dir)]
    return ["batch", str(jobs), "--out", str(out), *model, *extra]


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


# Job files -----------------------------------------------------------------------------------------------------------
def test_job_lines_expand_and_bad_lines_are_reported_by_number(tmp_path):
    request = GenerateRequest("a photo of dog", layout=Layout((Region("dog", (0, 0, 0.5, 1)),)), seed=3)
    chunk = {"version": 2, "request": request.to_dict(), "model": {"source": "demo"}}
    lines = [
        json.dumps(request.to_dict()),
        json.dumps(chunk | {"name": "pasted"}),  # a PNG's whole `troupe` chunk: the same picture
        "",
        "# a comment",
        json.dumps({"prompt": "a cat", "seeds": [1, 2, 3]}),
        json.dumps({"prompt": "a cat", "repeat": 2, "num_images": 2, "seed": 10}),
        json.dumps({"prompt": "a cat", "steps": 0}),
        "{not json",
        json.dumps({"prompt": "a cat", "seeds": [1], "seed": 4}),
        json.dumps({"prompt": "a cat", "repeat": 2}),
        json.dumps({"prompt": "a cat", "name": "../up"}),
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines))
    jobs = read_jobs(tmp_path / "jobs.jsonl")
    assert [p.line for p in jobs.problems] == [7, 8, 9, 11]
    assert "steps must be an integer" in str(jobs.problems[0]) and str(jobs.problems[0]).startswith("line 7: ")
    assert jobs.notes == ("line 2 asks for the picture of line 1: rendered once",)
    assert [j.line for j in jobs.jobs] == [1, 5, 5, 5, 6, 6, 10, 10]
    assert jobs.jobs[0].key == request_key(request) and jobs.jobs[0].files == (f"{request_key(request)[:16]}.png",)
    assert [j.request.seed for j in jobs.jobs[1:6]] == [1, 2, 3, 10, 12]  # repeat steps over num_images' seeds
    assert jobs.jobs[4].files[1].endswith("-2.png")
    seedless = [j.request.seed for j in jobs.jobs[6:]]
    assert seedless == [j.request.seed for j in read_jobs(tmp_path / "jobs.jsonl").jobs[6:]]  # stable across runs
    assert seedless[1] == seedless[0] + 1


def test_the_hash_leaves_out_defaults_so_new_fields_do_not_rename_finished_jobs():
    minimal = hashlib.sha256(b'{"prompt":"a cat","seed":1}').hexdigest()
    assert request_key(GenerateRequest("a cat", seed=1)) == minimal
    assert request_key(GenerateRequest("a cat", seed=1, steps=21)) != minimal


def test_an_empty_or_missing_job_file_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="holds no jobs"):
        read_jobs(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="does not exist"):
        read_jobs(tmp_path / "missing.jsonl")


def test_unknown_subjects_relations_and_lora_files_are_caught_up_front(studio, tmp_path):
    lines = [{"prompt": "a <milo>"}, {"prompt": "a dog", "relation": "nope"}, {"prompt": "a dog",
             "loras": [{"path": "gone.safetensors"}]}, {"prompt": "a <rex>", "relation": "test-lean"}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    jobs = studio.read_jobs(tmp_path / "jobs.jsonl")
    assert [str(p).split(":")[0] for p in jobs.problems] == ["line 1", "line 2", "line 3"]
    assert "no subject named <milo>" in str(jobs.problems[0]) and len(jobs.jobs) == 1


# Running -------------------------------------------------------------------------------------------------------------
def test_a_pasted_png_renders_the_cli_generate_bytes(studio, tiny_sd15_dir, tmp_path):
    cli_png = tmp_path / "cli.png"
    args = ["--model", str(tiny_sd15_dir), "--library", str(studio.library_dir), "--steps", "2", "--seed", "6"]
    assert main(["generate", *args, "--prompt", "a photo of <rex>", "--box", "<rex>=0.1,0.1,0.7,0.9",
                 "--out", str(cli_png)]) == 0  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(Image.open(cli_png).info["troupe"] + "\n")
    assert main(batch_args(tiny_sd15_dir, studio, tmp_path / "jobs.jsonl", tmp_path / "out")) == 0
    [(name, data)] = pngs(tmp_path / "out").items()
    assert data == cli_png.read_bytes() and name == request_key(studio.read_request(cli_png))[:16] + ".png"


def test_bad_lines_are_listed_the_rest_render_and_a_rerun_renders_nothing(studio, tiny_sd15_dir, tmp_path, capsys):
    jobs, out = mixed_jobs(tmp_path / "jobs.jsonl"), tmp_path / "out"
    assert main(batch_args(tiny_sd15_dir, studio, jobs, out, "--strict")) == 1  # --strict: nothing runs
    assert not out.exists()
    assert main(batch_args(tiny_sd15_dir, studio, jobs, out)) == 1  # the bad line makes the exit code 1
    err = capsys.readouterr().err
    assert f"jobs.jsonl: line {BAD_LINE}: steps must be an integer" in err and "6 job(s), 1 bad line(s)" in err
    assert "job 6/6" in err and "jobs/s" in err and "eta" in err
    records = manifest_lines(out)
    assert len(records) == 6 and {r["status"] for r in records} == {"ok"}
    assert len(pngs(out)) == 6 and sum(name.startswith("boxes-") for name in pngs(out)) == 1
    assert all(r["worker"].endswith("(in-process)") and r["seconds"] > 0 and r["attempts"] == 1 for r in records)
    before = pngs(out)
    assert main(batch_args(tiny_sd15_dir, studio, jobs, out)) == 1
    assert "0 rendered, 6 already done" in capsys.readouterr().err
    assert len(manifest_lines(out)) == 6 and pngs(out) == before


def test_a_failing_job_is_retried_once_recorded_and_never_stops_the_batch(studio, tmp_path, monkeypatch):
    add_subject(studio, "stranger", fingerprint="another-model")  # its residual fits no loaded model: fails each time
    lines = [{"prompt": "a photo of dog", "steps": 2, "seed": 1}, {"prompt": "a photo of <stranger>", "steps": 2},
             {"prompt": "a photo of cat", "steps": 2, "seed": 1}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    monkeypatch.setenv(FAULT_ENV, f"raise-once:{tmp_path / 'marker'}")  # the first job fails once, mid-job
    summary = studio.run_batch(studio.read_jobs(tmp_path / "jobs.jsonl"), BatchOptions(str(tmp_path / "out")))
    assert (summary.rendered, summary.failed) == (2, 1) and "register it again" in summary.failures[0]
    first, stranger, last = manifest_lines(tmp_path / "out")
    assert first["attempts"] == 2 and "injected fault" in first["errors"][0] and first["status"] == "ok"
    assert stranger["status"] == "failed" and stranger["attempts"] == 2 and stranger["files"] == []
    assert last["status"] == "ok" and last["attempts"] == 1
    summary = studio.run_batch(studio.read_jobs(tmp_path / "jobs.jsonl"), BatchOptions(str(tmp_path / "out")))
    assert (summary.rendered, summary.failed, summary.skipped) == (0, 1, 2)  # only the failed job is tried again


def test_an_output_folder_belongs_to_one_model(studio, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MANIFEST).write_text(json.dumps({"key": "k", "model": "demo", "status": "ok"}) + "\n")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a dog", "steps": 1}))
    with pytest.raises(InputError, match="holds pictures of model demo"):
        studio.run_batch(studio.read_jobs(tmp_path / "jobs.jsonl"), BatchOptions(str(tmp_path / "out")))


def test_a_driver_killed_mid_batch_resumes_to_the_same_bytes(studio, tiny_sd15_dir, tmp_path):
    """SIGKILL the driver once two jobs are in the manifest; the same command finishes the rest: every PNG byte for
    byte as in an uninterrupted run, and each job once in the manifest."""
    lines = [{"prompt": "a photo of dog and cat", "steps": 3, "seed": s} for s in range(8)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(batch_args(tiny_sd15_dir, studio, jobs, tmp_path / "whole")) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "studio", *batch_args(tiny_sd15_dir, studio, jobs, out)]
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / MANIFEST).is_file() and len((out / MANIFEST).read_text().splitlines()) >= 2:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert driver.wait(60) == -signal.SIGKILL, "the driver finished before it could be killed"
    assert len(manifest_lines(out)) < 8
    assert main(batch_args(tiny_sd15_dir, studio, jobs, out)) == 0
    assert pngs(out) == pngs(tmp_path / "whole") and len(pngs(out)) == 8
    keys = [r["key"] for r in manifest_lines(out)]
    assert len(keys) == len(set(keys)) == 8
