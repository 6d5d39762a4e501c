"""SIGKILL at every fault point (engines/faults.py) of registration, relation training, library writes, imports and
batch runs: afterwards the library passes `subjects check`, nothing half-written is visible, and the next run resumes
or starts clean.

Each kill runs in a forked child of this process: it has the tiny model and every module loaded already (a fresh
interpreter spends ~25 s importing diffusers on a shared core), arms one point, does the work and is SIGKILLed by the
point. The default suite runs a representative subset (DEFAULT); TROUPE_KILL_ALL=1 runs every point. One test starts a
fresh interpreter to show the TROUPE_FAULT variable itself works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engines import faults
from engines.batch.manifest import MANIFEST, Manifest
from engines.library import SubjectLibrary
from engines.library_check import check_library
from engines.register import register_subject
from engines.relations.library import RelationLibrary
from engines.service import Studio
from engines.types import InputError, ModelSpec, RegisterRequest, RelationTrainRequest, SubjectInfo
from engines.types.batch import BatchOptions
from tests.engines.test_relation_learning import write_examples
from tests.tiny_models import subject_photos

ROOT = Path(__file__).resolve().parents[2]
TRAIN = dict(steps=6, lr=2e-4, batch=1, reg_batch=2, reg_pool=16, delta_sentences=16, checkpoint_every=2)


@pytest.fixture(scope="module")
def studio(tiny_sd15_dir, tmp_path_factory) -> Studio:
    torch.set_num_threads(1)  # a forked child must not inherit a thread pool it cannot use
    made = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path_factory.mktemp("unused"))
    made.bundle  # noqa: B018 - loaded once, before any fork
    return made


@pytest.fixture
def world(studio, tmp_path) -> dict:
    """A library holding <ada>, photos, an export of <ada>, relation examples and a job file."""
    root = tmp_path / "library"
    torch.manual_seed(0)
    info = SubjectInfo("ada", "cat", "sd15", studio.bundle.fingerprint, "2026-01-01T00:00:00+00:00", 2)
    photo = Image.new("RGB", (32, 32), (200, 40, 40))
    library = SubjectLibrary(root)
    library.add(info, {"text_encoder": torch.randn(1, 32) * 0.5}, [photo], [Image.new("L", (32, 32), 255)])
    export = library.export("ada", tmp_path / "ada.safetensors")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": f"a red ball {i}", "steps": 1, "seed": i}) for i in (1, 2)))
    return dict(
        root=root,
        photos=subject_photos(tmp_path, "photo", 2),
        export=export,
        examples=write_examples(tmp_path / "examples"),
        jobs=jobs,
        out=tmp_path / "out",
    )


# ------------------------------------------------------------------------------------------------ the work
def register(studio, world, steps: list[int]) -> None:
    request = RegisterRequest("rex", "dog", world["photos"], preset="quick")
    register_subject(studio.bundle, request, SubjectLibrary(world["root"]), lambda p: steps.append(p.step),
                     overrides=TRAIN)  # fmt: skip


def import_new(studio, world, steps) -> None:
    SubjectLibrary(world["root"]).import_file(world["export"], name="bo")


def import_over(studio, world, steps) -> None:
    SubjectLibrary(world["root"]).import_file(world["export"], overwrite=True)


def delete(studio, world, steps) -> None:
    SubjectLibrary(world["root"]).delete("ada")


def teach(studio, world, steps) -> None:
    view = studio.with_library(world["root"])
    request = RelationTrainRequest("leaning", str(world["examples"]), steps=3)
    view.teach_relation(request, lambda p: steps.append(p.step))


def batch(studio, world, steps) -> None:
    studio.run_batch(studio.read_jobs(world["jobs"]), BatchOptions(str(world["out"]), retries=0))


# (work, fault point, the subjects a fresh process lists after the kill, what the rerun does)
CASES = {
    "register.start": (register, ["ada"], "starts clean"),
    "register.step@3": (register, ["ada"], "resumes at step 3"),
    "checkpoint.save.between@2": (register, ["ada"], "starts clean"),
    "checkpoint.saved": (register, ["ada"], "resumes at step 3"),
    "register.trained": (register, ["ada"], "resumes at step 5"),
    "library.add.writing": (register, ["ada"], "resumes at step 5"),
    "library.add.written": (register, ["ada"], "resumes at step 5"),
    "register.added": (register, ["ada", "rex"], "already done"),
    "library.add.written/import": (import_new, ["ada"], "starts clean"),
    "library.add.swapped/import": (import_over, ["ada"], "starts clean"),
    "library.add.placed/import": (import_over, ["ada"], "starts clean"),
    "library.remove.moved/delete": (delete, [], "already done"),
    "relation.step@2/teach": (teach, ["ada"], "starts clean"),
    "relation.trained/teach": (teach, ["ada"], "starts clean"),
    "relations.add.written/teach": (teach, ["ada"], "starts clean"),
    "relation.added/teach": (teach, ["ada"], "already done"),
    "batch.file.written/batch": (batch, ["ada"], "renders 2"),
    "batch.files.written/batch": (batch, ["ada"], "renders 2"),
    "batch.manifest.half/batch": (batch, ["ada"], "renders 2"),
}
DEFAULT = ["register.step@3", "library.add.written", "library.add.swapped/import", "batch.manifest.half/batch"]
RUN = list(CASES) if os.environ.get("TROUPE_KILL_ALL") == "1" else DEFAULT


def killed_at(point: str, work, studio, world) -> int:
    """Fork, arm `point` in the child, do the work there; the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            faults._ARMED.update(faults._parse(point))
            work(studio, world, [])
        except BaseException:  # noqa: BLE001 - a child that finishes without being killed fails the test
            code = 3
        os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("case", RUN)
def test_a_kill_at_each_point_leaves_a_whole_library_and_the_rerun_finishes(case, studio, world):
    work, listed, rerun = CASES[case]
    status = killed_at(case.split("/")[0], work, studio, world)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child was not killed at {case}"
    library = SubjectLibrary(world["root"])  # as a new process sees it
    assert [s.name for s in library.list()] == listed  # whole entries only, never a half-written one
    assert check_library(library) == []  # `subjects check` passes
    assert [r.name for r in RelationLibrary(world["root"]).list()] in ([], ["leaning"])
    assert not [p for p in world["root"].iterdir() if not p.name.startswith(".") and p.name not in listed]
    steps: list[int] = []
    if rerun == "already done":
        with pytest.raises(InputError):  # the work was complete: the name is taken, or the subject is gone
            work(studio, world, steps)
    else:
        work(studio, world, steps)
    if rerun.startswith("resumes"):
        assert steps[0] == int(rerun.split()[-1])
    elif rerun == "starts clean" and work in (register, teach):
        assert steps[0] == 1
    if work is batch:
        records = Manifest(world["out"]).records()
        assert sorted(r["status"] for r in records)[-2:] == ["ok", "ok"]
        assert all((world["out"] / f).is_file() for r in records for f in r["files"])
        assert not [p for p in world["out"].iterdir() if p.name not in (MANIFEST,) and not p.name.endswith(".png")]
    assert check_library(SubjectLibrary(world["root"])) == []


def test_swept_leftovers_leave_no_trace(studio, world):
    """After a kill mid-swap and the next write, no hidden .old-/.trash- folder stays behind."""
    status = killed_at("library.add.swapped", import_over, studio, world)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert [p.name[:5] for p in world["root"].iterdir() if p.name.startswith(".old-")] == [".old-"]
    import_new(studio, world, [])
    assert sorted(p.name for p in world["root"].iterdir() if not p.name.startswith(".tmp-")) == ["ada", "bo"]
    shutil.rmtree(world["out"], ignore_errors=True)


def test_the_environment_variable_kills_a_fresh_process():
    """TROUPE_FAULT is read once, at import: the point SIGKILLs the process (no torch needed to show it)."""
    code = "from engines.faults import fault_point; fault_point('a.b'); fault_point('x.y'); print('survived')"
    env = {**os.environ, "TROUPE_FAULT": "x.y"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout
    env["TROUPE_FAULT"] = "x.y@2:exit"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True).returncode == 0
    env["TROUPE_FAULT"] = "x.y:explode"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "TROUPE_FAULT: bad entry 'x.y:explode'" in done.stderr
