"""A full disk during a library write, and an out-of-memory error mid-step: one line, the old state, and the studio
serves the next job (engines/faults.py arms the errors; engines/atomic.py and engines/service.py handle them)."""

from __future__ import annotations

import errno
import hashlib
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from engines import faults
from engines.library import SubjectLibrary
from engines.library_check import check_library
from engines.service import Studio, out_of_memory
from engines.types import GenerateRequest, InputError, ModelSpec, SubjectInfo
from tests.engines.test_kill_points import TRAIN
from tests.tiny_models import subject_photos


@pytest.fixture(scope="module")
def studio(tiny_sd15_dir, tmp_path_factory) -> Studio:
    torch.set_num_threads(1)
    made = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path_factory.mktemp("library"))
    info = SubjectInfo("ada", "cat", "sd15", made.bundle.fingerprint, "2026-01-01T00:00:00+00:00", 2)
    red = Image.new("RGB", (32, 32), (200, 40, 40))
    made.library.add(info, {"text_encoder": torch.randn(1, 32) * 0.5}, [red], [Image.new("L", (32, 32), 255)])
    return made


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def full_disk_after(limit: int):
    """Image.save that writes `limit` bytes of the file, then finds the disk full."""
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        real(self, fp, *args, **kwargs)
        data = Path(fp).read_bytes()
        Path(fp).write_bytes(data[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_mid_write_leaves_the_old_subject_and_says_so_in_one_line(studio, tmp_path, monkeypatch):
    exported = studio.export_subject("ada", tmp_path / "ada.safetensors")
    before = snapshot(studio.library_dir)
    monkeypatch.setattr(Image.Image, "save", full_disk_after(100))
    for name in ("bo", "ada"):  # a new subject, and one replacing the old
        library = SubjectLibrary(studio.library_dir)
        with pytest.raises(InputError) as error:
            library.import_file(exported, name=name, overwrite=True)
        assert str(error.value) == f"cannot save subject '{name}': no space left on device — nothing was changed"
        assert snapshot(studio.library_dir) == before  # byte for byte: no temporary folder left either
    assert [s.name for s in studio.subjects()] == ["ada"] and check_library(studio.library) == []


def test_a_full_disk_while_a_relation_is_written_changes_nothing(studio, monkeypatch):
    from engines.relations import library as relations

    before = snapshot(studio.library_dir)
    monkeypatch.setattr(relations, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "")))
    info = relations.card_to_info(
        {"name": "leaning", "relation": "leaning on", "template": "{a} leaning on {b}", "boxes": [[0, 0, 0.5, 1],
         [0.5, 0, 1, 1]], "layers": [0, 1], "family": "sd15", "fingerprint": "x", "created": "", "steps": 1,
         "rank": 4, "keypoint_weight": 0.0, "examples": 1, "seconds": 0.0, "loss_curve": []}, "", "test")  # fmt: skip
    with pytest.raises(InputError, match="cannot save relation 'leaning': no space left on device"):
        studio.relation_library.add(info, {"x.lora_A.weight": torch.zeros(1)})
    assert snapshot(studio.library_dir) == before


def test_out_of_memory_frees_what_the_step_held_and_is_one_line(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    held = []

    def step() -> None:
        activations = torch.zeros(1000)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    with pytest.raises(InputError, match="^out of memory while generating: nothing was saved") as error:
        with out_of_memory("generating"):
            step()
    assert held[0]() is None  # the failed step's tensors are gone, not kept alive by the traceback
    assert error.value.__context__.__traceback__ is None and emptied == [True]
    with pytest.raises(ValueError):  # any other error goes through as it is
        with out_of_memory("generating"):
            raise ValueError("not memory")


def test_the_studio_serves_the_next_job_after_running_out_of_memory(studio, tmp_path):
    request = GenerateRequest("a red ball", seed=1, steps=3)
    with faults.armed("generate.step@2:oom"), pytest.raises(InputError, match="out of memory while generating"):
        studio.generate(request)
    assert len(studio.generate(request).images) == 1  # the model stayed loaded and usable
    from engines.types import RegisterRequest

    photos = subject_photos(tmp_path, "p", 1)
    with faults.armed("register.step@2:oom"), pytest.raises(InputError, match="out of memory while registering"):
        from engines.register import register_subject

        with out_of_memory("registering"):
            register_subject(studio.bundle, RegisterRequest("rex", "dog", photos, preset="quick"), studio.library,
                             overrides=TRAIN)  # fmt: skip
    assert [s.name for s in studio.subjects()] == ["ada"] and check_library(studio.library) == []
    assert len(studio.generate(request).images) == 1


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_last_one_and_is_one_line(tmp_path):
    from engines.checkpoint import Checkpoint, TrainingState

    layer = torch.nn.Linear(3, 2)
    state = TrainingState({"layer": layer}, torch.optim.AdamW(layer.parameters()))
    first = Checkpoint(tmp_path / "first", "run")  # the disk is full at the first save: no checkpoint yet
    with faults.armed("checkpoint.save.writing:enospc"), pytest.raises(InputError) as error:
        first.save(state, 1)
    assert str(error.value) == "cannot save the training checkpoint: no space left on device — nothing was changed"
    assert snapshot(tmp_path / "first") == {} and first.load(state) is None
    later = Checkpoint(tmp_path / "later", "run")  # ... or at a later one: the last good checkpoint stays whole
    later.save(state, 1)
    kept, weights = snapshot(tmp_path / "later"), layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    with faults.armed("checkpoint.save.writing:enospc"), pytest.raises(InputError, match="nothing was changed"):
        later.save(state, 2)  # the tensors' part was written in full when the disk filled up
    assert snapshot(tmp_path / "later") == kept  # byte for byte, and no .part file left
    assert later.load(state).step == 1 and torch.equal(layer.weight, weights)
