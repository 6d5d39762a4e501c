"""The VAE and textual inversions an image was made with, in its PNG (Troupe's chunk and A1111's `VAE hash`, `VAE`
and `TI hashes` fields), and a reused PNG saying which of them the model does not load now (issue 19)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from engines.embeddings import Embedding
from engines.metadata import CHUNK, file_hash, png_info, save_png
from engines.png_import import open_png, unloaded_files
from engines.types import GenerateRequest, ModelSpec
from engines.types.opened import ModelFile

REQUEST = GenerateRequest("a red ball, EasyNegative-free art", negative_prompt="embedding:badhands, blurry", seed=3)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    made = {}
    for name in ("vae-ft-mse.safetensors", "badhands.safetensors", "unused.safetensors"):
        made[name] = tmp_path / name
        made[name].write_bytes(name.encode() * 50)
    return made


def bundle(files, **spec):
    embeddings = tuple(Embedding(p.stem, (f"ti{k}v0{p.stem}",), p) for k, p in enumerate(
        [files["badhands.safetensors"], files["unused.safetensors"]]))  # fmt: skip
    spec = ModelSpec("demo", vae=str(files["vae-ft-mse.safetensors"]), embeddings=tuple(str(e.path) for e in embeddings),
                     **spec)  # fmt: skip
    return SimpleNamespace(spec=spec, family="sd15", fingerprint="0" * 16, native_size=512, embeddings=embeddings,
                           pipe=SimpleNamespace(scheduler=None))  # fmt: skip


def written(tmp_path, files, request=REQUEST) -> Path:
    image = Image.new("RGB", (8, 8))
    image.info.update(png_info(request, bundle(files)))
    return save_png(image, tmp_path / "out.png")


def test_the_vae_and_the_embeddings_the_prompt_names_are_written(tmp_path, files, monkeypatch):
    monkeypatch.setattr("engines.metadata.model_hash", lambda source: "abcdef0123")  # the demo model's: not the point
    path = written(tmp_path, files)
    text = Image.open(path).text
    vae, bad = sha(files["vae-ft-mse.safetensors"]), sha(files["badhands.safetensors"])
    assert f"VAE hash: {vae[:10]}, VAE: vae-ft-mse.safetensors, " in text["parameters"]
    assert text["parameters"].endswith(f'TI hashes: "badhands: {bad[:12]}"')  # `unused` is not in the prompt
    model = json.loads(text[CHUNK])["model"]
    assert model["vae"] == {"name": "vae-ft-mse.safetensors", "hash": vae[:10]}
    assert model["embeddings"] == [{"name": "badhands", "file": "badhands.safetensors", "hash": bad[:12]}]


def test_no_vae_and_no_embedding_write_nothing(tmp_path, files):
    image = Image.new("RGB", (8, 8))
    plain = SimpleNamespace(**{**vars(bundle(files)), "spec": ModelSpec("demo"), "embeddings": ()})
    image.info.update(png_info(REQUEST, plain))
    assert "VAE" not in image.info["parameters"] and "TI hashes" not in image.info["parameters"]
    assert set(json.loads(image.info[CHUNK])["model"]) == {"source", "family", "fingerprint"}


def test_a_reused_png_names_the_files_it_was_made_with_that_are_not_loaded(tmp_path, files):
    opened = open_png(written(tmp_path, files))
    assert {f.name for f in opened.files} == {"vae-ft-mse.safetensors", "badhands"}
    same = bundle(files).spec
    assert unloaded_files(opened, same).note == ""  # the same files loaded: nothing to say
    bare = unloaded_files(opened, ModelSpec("demo"))
    assert bare.note.startswith("This PNG was made with VAE vae-ft-mse.safetensors (") and "\n" not in bare.note
    assert "embedding badhands (" in bare.note and bare.note.endswith("loaded with --vae and --embedding")
    other = files["unused.safetensors"]  # the right name with other contents is not the same file
    renamed = other.with_name("badhands.safetensors")
    files["badhands.safetensors"].unlink()
    other.rename(renamed)
    assert [f.name for f in unloaded_files(opened, same).unloaded] == ["badhands"]


def test_a1111_vae_and_ti_fields_are_read_not_dropped(tmp_path, files):
    vae = sha(files["vae-ft-mse.safetensors"])[:10]
    text = ("a cabin\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Model hash: 6ce0161689, "
            f'Model: v1-5, VAE hash: {vae}, VAE: vae-ft-mse.safetensors, TI hashes: "EasyNegative: c74b4e810b03, '
            'badhands: 0123456789ab", Version: v1.10.1')  # fmt: skip
    image = Image.new("RGB", (8, 8))
    image.save(tmp_path / "a.png", pnginfo=_info(parameters=text))
    opened = open_png(tmp_path / "a.png")
    assert opened.files == (ModelFile("VAE", "vae-ft-mse.safetensors", vae),
                            ModelFile("embedding", "EasyNegative", "c74b4e810b03"),
                            ModelFile("embedding", "badhands", "0123456789ab"))  # fmt: skip
    checked = unloaded_files(opened, ModelSpec("demo", vae=str(files["vae-ft-mse.safetensors"])))
    assert [f.name for f in checked.unloaded] == ["EasyNegative", "badhands"]
    assert "--embedding" in checked.note and "--vae" not in checked.note and "Not carried over" in checked.note


def test_a_vae_folders_hash_follows_its_files(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 10)
    first = file_hash(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"v" * 11)
    assert file_hash(folder) != first and len(first) == 64


def test_sd_parsers_reads_the_vae_and_ti_fields_as_written(tmp_path, files):
    sd_parsers = pytest.importorskip("sd_parsers")
    info = sd_parsers.ParserManager().parse(str(written(tmp_path, files)))
    assert info.generator.name == "AUTOMATIC1111"
    assert info.metadata["VAE"] == "vae-ft-mse.safetensors"
    assert info.metadata["VAE hash"] == sha(files["vae-ft-mse.safetensors"])[:10]
    # sd-parsers skips any field whose value holds a colon (it splits items on ":"), so it cannot read `TI hashes`
    # as A1111 itself writes it either; the fields around it still read as written.
    assert "TI hashes" not in info.metadata and info.samplers[0].parameters["seed"] == "3"
    assert [p.value for p in info.samplers[0].negative_prompts] == [REQUEST.negative_prompt]


def _info(**chunks):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return info


def test_an_image_from_before_these_fields_needs_nothing(tmp_path, files):
    path = written(tmp_path, files)
    data = json.loads(Image.open(path).text[CHUNK])
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("vae", "embeddings")}
    old = tmp_path / "old.png"
    Image.new("RGB", (8, 8)).save(old, pnginfo=_info(**{CHUNK: json.dumps(data)}))
    assert replace(unloaded_files(open_png(old), ModelSpec("demo")), request=REQUEST).note == ""
