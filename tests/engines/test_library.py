"""The subject library: atomic folders, validation, rename/delete, export/import, Hub push/pull (stand-in)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engines.library import SubjectLibrary
from engines.types import InputError, SubjectInfo


def info(name="rex", family="sdxl", fingerprint="abc123", curve=(1.0, 0.5)) -> SubjectInfo:
    return SubjectInfo(
        name=name,
        class_word="dog",
        family=family,
        fingerprint=fingerprint,
        created="2026-01-01T00:00:00+00:00",
        steps=len(curve),
        loss_curve=tuple(curve),
    )


def residuals(width1=768, width2=1280, tokens=1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {"text_encoder": torch.randn(tokens, width1)}
    if width2:
        out["text_encoder_2"] = torch.randn(tokens, width2)
    return out


def photos(n=2, side=64):
    return (
        [Image.new("RGB", (side, side), (30 * i, 100, 200)) for i in range(n)],
        [Image.new("L", (side, side), 255) for _ in range(n)],
    )


@pytest.fixture
def library(tmp_path) -> SubjectLibrary:
    return SubjectLibrary(tmp_path / "lib")


def add(library, name="rex", **kwargs):
    images, masks = photos()
    return library.add(info(name, **kwargs), residuals(), images, masks)


def test_add_get_list_residuals(library):
    added = add(library)
    add(library, "ada")
    assert [s.name for s in library.list()] == ["ada", "rex"]
    assert library.get("rex") == added and added.class_word == "dog" and added.loss_curve == (1.0, 0.5)
    assert Path(added.thumbnail).is_file() and len(added.photos) == 2
    res = library.residuals("rex")
    assert res["text_encoder"].dtype == torch.float32 and res["text_encoder"].shape == (1, 768)
    assert torch.equal(res["text_encoder_2"], residuals()["text_encoder_2"])
    assert not [p for p in library.root.iterdir() if p.name.startswith(".tmp")]  # nothing transient left


def test_leftovers_of_killed_writes_are_swept(library):
    import os
    import time

    add(library)
    old, fresh, trash = library.root / ".tmp-bo-old", library.root / ".tmp-bo-new", library.root / ".trash-x-1"
    for folder in (old, fresh, trash):
        folder.mkdir()
        (folder / "subject.json").write_text("{}")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert [s.name for s in library.list()] == ["rex"]  # leftovers are never listed
    add(library, "ada")
    assert not old.exists() and not trash.exists() and fresh.exists()  # a fresh one may be another writer's


def test_storage_is_a_few_kilobytes_plus_photos(library):
    """An SDXL-size subject (768 + 1280 floats) with a 1,000-point loss curve: residuals + metadata < 12 KB."""
    images, masks = photos()
    library.add(info(curve=[1.0 / (i + 1) for i in range(1000)]), residuals(), images, masks)
    folder = library.root / "rex"
    size = (folder / "residuals.safetensors").stat().st_size + (folder / "subject.json").stat().st_size
    assert size < 12_000, size


def test_missing_subject_names_the_registered_ones(library):
    add(library, "ada")
    add(library, "bo")
    with pytest.raises(InputError, match=r"no subject named 'x' \(registered: ada, bo\)"):
        library.get("x")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a b", "x" * 41, "..", "/etc"])
def test_names_are_validated(library, bad):
    add(library)
    images, masks = photos()
    with pytest.raises(InputError):
        library.add(info(bad), residuals(), images, masks)
    with pytest.raises(InputError):
        library.get(bad)
    with pytest.raises(InputError):
        library.rename("rex", bad)
    with pytest.raises(InputError):
        library.delete(bad)
    assert [s.name for s in library.list()] == ["rex"]
    assert sorted(p.name for p in library.root.iterdir()) == ["rex"]


def test_duplicate_and_overwrite(library):
    add(library)
    with pytest.raises(InputError, match="already exists"):
        add(library)
    images, masks = photos(1)
    library.add(info(curve=(3.0,)), residuals(), images, masks, overwrite=True)
    assert library.get("rex").loss_curve == (3.0,) and len(library.get("rex").photos) == 1
    assert sorted(p.name for p in library.root.iterdir()) == ["rex"]


def test_rename_and_delete(library):
    add(library)
    add(library, "ada")
    renamed = library.rename("rex", "milo")
    assert renamed.name == "milo" and Path(renamed.photos[0]).parent.name == "milo"
    assert [s.name for s in library.list()] == ["ada", "milo"]
    with pytest.raises(InputError, match="already exists"):
        library.rename("milo", "ada")
    library.delete("milo")
    assert [s.name for s in library.list()] == ["ada"]
    with pytest.raises(InputError, match="no subject named 'milo'"):
        library.delete("milo")
    assert sorted(p.name for p in library.root.iterdir()) == ["ada"]


def test_broken_folders_are_skipped_with_a_warning(library, caplog):
    add(library)
    add(library, "ada")
    meta = json.loads((library.root / "ada" / "subject.json").read_text())
    (library.root / "ada" / "subject.json").write_text(json.dumps({**meta, "colour": "red"}))
    (library.root / "junk").mkdir()
    with caplog.at_level(logging.WARNING):
        assert [s.name for s in library.list()] == ["rex"]
    assert "unknown keys colour" in caplog.text and "junk" in caplog.text
    with pytest.raises(InputError, match="unknown keys colour"):
        library.get("ada")
    (library.root / "ada" / "subject.json").write_text(json.dumps({**meta, "steps": "many"}))
    with pytest.raises(InputError, match="'steps' must be a int"):
        library.get("ada")


def test_check_compatible_says_what_it_was_trained_on(library):
    add(library, family="sdxl", fingerprint="f1")
    library.check_compatible("rex", "sdxl", "f1")
    with pytest.raises(InputError, match="trained on a sdxl model; the loaded model is sd15"):
        library.check_compatible("rex", "sd15", "f1")
    with pytest.raises(InputError, match="different sdxl model"):
        library.check_compatible("rex", "sdxl", "f2")


def test_export_import_round_trip(library, tmp_path):
    add(library)
    exported = library.export("rex", tmp_path / "out")
    assert exported.name == "rex.safetensors"
    other = SubjectLibrary(tmp_path / "other")
    imported = other.import_file(exported)
    assert imported.name == "rex" and imported.class_word == "dog" and imported.family == "sdxl"
    assert imported.fingerprint == "abc123" and imported.loss_curve == (1.0, 0.5)
    for key, value in library.residuals("rex").items():
        assert torch.equal(other.residuals("rex")[key], value)
    for a, b in zip(library.get("rex").photos, imported.photos):
        assert Image.open(a).tobytes() == Image.open(b).tobytes()
    assert other.import_file(exported, name="rex2").name == "rex2"
    with pytest.raises(InputError, match="already exists"):
        other.import_file(exported)


def test_import_refuses_foreign_files(library, tmp_path):
    pickle_file = tmp_path / "rex.pt"
    torch.save({"text_encoder": torch.zeros(1, 8)}, pickle_file)
    with pytest.raises(InputError, match=r"\.safetensors"):
        library.import_file(pickle_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable safetensors"):
        library.import_file(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"text_encoder": torch.zeros(1, 8)}, str(plain))
    with pytest.raises(InputError, match="no Troupe subject metadata"):
        library.import_file(plain)
    add(library)
    exported = library.export("rex", tmp_path / "x.safetensors")
    evil = tmp_path / "evil.safetensors"
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    payload = json.loads(meta["troupe_subject"])
    save_file(tensors, str(evil), metadata={"troupe_subject": json.dumps({**payload, "name": "../evil"})})
    with pytest.raises(InputError, match="not allowed"):
        SubjectLibrary(tmp_path / "third").import_file(evil)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "third").exists()


def test_push_pull_through_a_local_stand_in(library, tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = {}

    def upload_file(path_or_fileobj, path_in_repo, repo_id, token=None, **kwargs):
        calls["upload"] = (repo_id, path_in_repo, token)
        target = hub / repo_id / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path_or_fileobj, target)

    def hf_hub_download(repo_id, filename, token=None, revision=None, **kwargs):
        calls["download"] = (repo_id, filename, revision)
        return str(hub / repo_id / filename)

    monkeypatch.setattr(huggingface_hub, "upload_file", upload_file)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    add(library)
    assert library.push("rex", "me/subjects", token="t") == "rex.safetensors"
    assert calls["upload"] == ("me/subjects", "rex.safetensors", "t")
    other = SubjectLibrary(tmp_path / "other")
    pulled = other.pull("me/subjects", "rex.safetensors", name="rexy")
    assert pulled.name == "rexy" and torch.equal(
        other.residuals("rexy")["text_encoder"], library.residuals("rex")["text_encoder"]
    )
    with pytest.raises(InputError, match="safetensors"):
        other.pull("me/subjects", "rex.bin")


# ------------------------------------------------------------------------------------------ command line
def test_cli_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, studio.__main__ as cli; cli.build_parser(); raise SystemExit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


def test_cli_register_and_manage_subjects(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    import engines.register
    from studio.__main__ import main
    from tests.tiny_models import save_tiny, subject_photos

    monkeypatch.setitem(
        engines.register.PRESETS,
        "quick",
        replace(engines.register.PRESETS["quick"], steps=3, reg_pool=16, delta_sentences=32),
    )
    model = save_tiny("sd15", tmp_path / "tiny")
    photo = subject_photos(tmp_path, "p", count=1)[0]  # a photo with a subject in it (a flat one is refused)
    lib = str(tmp_path / "lib")
    args = [
        "register",
        "--model",
        str(model),
        "--name",
        "rex",
        "--class",
        "dog",
        photo,
        "--preset",
        "quick",
        "--library",
        lib,
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "registered <rex>" in out.out and "step 3/3" in out.err and "loss" in out.err
    assert main(["subjects", "list", "--library", lib]) == 0 and "rex" in capsys.readouterr().out
    assert main(["subjects", "rename", "rex", "../x", "--library", lib]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: subject name '../x' is not allowed")
    assert main(["subjects", "export", "rex", str(tmp_path / "out"), "--library", lib]) == 0
    assert (
        main(["subjects", "import", str(tmp_path / "out" / "rex.safetensors"), "--name", "rex2", "--library", lib]) == 0
    )
    assert main(["subjects", "delete", "rex", "--library", lib]) == 0
    assert [s.name for s in SubjectLibrary(lib).list()] == ["rex2"]
    assert main(["subjects", "delete", "nobody", "--library", lib]) == 2
    assert "no subject named 'nobody' (registered: rex2)" in capsys.readouterr().err
