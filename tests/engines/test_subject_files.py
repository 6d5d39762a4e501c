"""Exported subject files: every tensor under `troupe.subject.`, a marker first, so that no embedding loader takes a
Cones 2 residual for a textual inversion; files in the older layout (bare `text_encoder`, `photo.0`, ...) still
import."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engines.library import SubjectLibrary
from engines.subject_files import EXPORT_KEY, FILE_PREFIX, LAYOUT_KEY
from engines.types import InputError, SubjectInfo

WIDTH = 32  # the tiny SD 1.5's text encoder


def add_rex(library: SubjectLibrary, width: int = 768) -> None:
    info = SubjectInfo("rex", "dog", "sd15", "abc123", "2026-01-01T00:00:00+00:00", 2, (1.0, 0.5))
    torch.manual_seed(0)
    photos = [Image.new("RGB", (32, 32), (40 * i, 100, 200)) for i in range(2)]
    masks = [Image.new("L", (32, 32), 255) for _ in range(2)]
    library.add(info, {"text_encoder": torch.randn(1, width)}, photos, masks)


def tensors_and_meta(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def test_exported_keys_are_namespaced_with_the_marker_first(tmp_path):
    library = SubjectLibrary(tmp_path / "lib")
    add_rex(library)
    path = library.export("rex", tmp_path / "rex.safetensors")
    tensors, _ = tensors_and_meta(path)
    assert all(key.startswith(FILE_PREFIX) for key in tensors)
    assert f"{FILE_PREFIX}residual.text_encoder" in tensors and f"{FILE_PREFIX}photo.1" in tensors
    # ComfyUI's embedding loader, given a file with no key it knows, takes the first tensor: the 1-element marker,
    # which no encoder can use, rather than the residual
    first_key, first = next(iter(load_file(str(path)).items()))
    assert first_key == LAYOUT_KEY and first.shape == (1,) and first.dtype == torch.int64


def test_a_residual_only_file_is_no_embedding_for_diffusers(sd15, tmp_path):
    """The layout-1 file of a subject without photos was one tensor of the encoder's width: exactly a textual
    inversion to diffusers' loader. The namespaced file is refused."""
    library = SubjectLibrary(tmp_path / "lib")
    add_rex(library, width=WIDTH)
    path = library.export("rex", tmp_path / "rex.safetensors", include_photos=False)
    pipe = sd15.pipe
    before = pipe.text_encoder.get_input_embeddings().weight.shape
    with pytest.raises(ValueError, match="state dictionary is incorrect"):
        pipe.load_textual_inversion(str(path), token="<rex-ti>")
    assert pipe.text_encoder.get_input_embeddings().weight.shape == before


def test_a_file_in_the_old_layout_still_imports(tmp_path):
    """Written as Troupe wrote subjects before the prefix: bare names, no marker."""
    library = SubjectLibrary(tmp_path / "lib")
    add_rex(library)
    new, meta = tensors_and_meta(library.export("rex", tmp_path / "new.safetensors"))
    old = {key.removeprefix(FILE_PREFIX).removeprefix("residual."): value for key, value in new.items()}
    del old["format"]
    assert set(old) == {"text_encoder", "thumbnail", "photo.0", "photo.1", "mask.0", "mask.1"}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={EXPORT_KEY: meta[EXPORT_KEY]})
    other = SubjectLibrary(tmp_path / "other")
    imported = other.import_file(tmp_path / "old.safetensors")
    assert imported.name == "rex" and len(imported.photos) == 2
    assert torch.equal(other.residuals("rex")["text_encoder"], library.residuals("rex")["text_encoder"])
    assert other.import_file(tmp_path / "new.safetensors", name="rex2").name == "rex2"  # and the new layout


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({LAYOUT_KEY: torch.tensor([3])}), "layout 3 is not one"),
        (lambda t: t.pop(LAYOUT_KEY), "layout none"),
        (lambda t: t.update({"text_encoder": torch.zeros(1, 768)}), "outside troupe.subject"),
        (lambda t: t.update({FILE_PREFIX + "residual.text_encoder_3": torch.zeros(1, 8)}), "unexpected residual"),
        (lambda t: t.update({FILE_PREFIX + "text_encoder": torch.zeros(1, 768)}), "unexpected tensor"),
    ],
)
def test_damaged_namespaced_files_are_one_line(tmp_path, change, message):
    library = SubjectLibrary(tmp_path / "lib")
    add_rex(library)
    tensors, meta = tensors_and_meta(library.export("rex", tmp_path / "rex.safetensors"))
    change(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(InputError, match=message):
        SubjectLibrary(tmp_path / "other").import_file(tmp_path / "bad.safetensors")
    assert json.loads(meta[EXPORT_KEY])["name"] == "rex"
