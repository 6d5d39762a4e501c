"""Photo intake: formats, EXIF orientation, refusals that write nothing, masks (GrabCut and an ONNX segmenter)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engines.images import (
    OnnxSegmenter,
    find_segmenter,
    grabcut_mask,
    load_photo,
    prepare_photos,
    segmenter_providers,
)
from engines.library import SubjectLibrary
from engines.models import ModelBundle, text_encoder_fingerprint
from engines.register import register_subject
from engines.types import InputError, ModelSpec, RegisterRequest
from tests.tiny_models import tiny_sd15

torch.set_num_threads(1)


def disk_photo(path: Path, size=(96, 80), box=(25, 15, 75, 65), fmt=None) -> Path:
    image = Image.new("RGB", size, (40, 140, 40))
    ImageDraw.Draw(image).ellipse(box, fill=(210, 30, 30))
    image.save(path, format=fmt)
    return path


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid small PNG whose header claims side×side pixels (never decoded: refused from the header)."""
    disk_photo(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_accepts_png_jpeg_webp(tmp_path, fmt, suffix):
    image = load_photo(disk_photo(tmp_path / f"a.{suffix}", fmt=fmt))
    assert image.mode == "RGB" and image.size == (96, 80)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (90, 40), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_photo(tmp_path / "rot.jpg").size == (40, 90)


def _bad_files(folder: Path) -> dict[str, Path]:
    text = folder / "notes.png"
    text.write_text("this is not an image")
    truncated = disk_photo(folder / "cut.jpg", size=(300, 300), fmt="JPEG")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    gif = folder / "anim.gif"
    Image.new("RGB", (64, 64)).save(gif)
    return {
        "not an image": text,
        "truncated": truncated,
        "pixels": bomb_png(folder / "bomb.png"),
        "too small": disk_photo(folder / "tiny.png", size=(20, 20), box=(2, 2, 18, 18)),
        "GIF": gif,
    }


def test_refusals_are_clear(tmp_path):
    for words, path in _bad_files(tmp_path).items():
        with pytest.raises(InputError, match=words if words != "not an image" else "not an image") as error:
            load_photo(path)
        assert path.name in str(error.value)


def test_refused_photo_writes_nothing(tmp_path):
    """One bad file among good ones refuses the whole registration before anything touches the library."""
    pipe = tiny_sd15()
    bundle = ModelBundle(
        pipe, ModelSpec("tiny"), "sd15", torch.device("cpu"), torch.float32, text_encoder_fingerprint(pipe)
    )
    root = tmp_path / "library"
    good = disk_photo(tmp_path / "good.png")
    for bad in _bad_files(tmp_path).values():
        request = RegisterRequest(name="rex", class_word="dog", photos=(str(good), str(bad)), preset="quick")
        with pytest.raises(InputError):
            register_subject(bundle, request, SubjectLibrary(root))
        assert not root.exists()


def test_grabcut_mask_and_crop_find_the_subject(tmp_path):
    path = disk_photo(tmp_path / "d.png", size=(160, 100), box=(90, 20, 150, 80))
    fg = grabcut_mask(load_photo(path))  # (100, 160)
    truth = np.zeros((100, 160), bool)
    yy, xx = np.mgrid[0:100, 0:160]
    truth[((xx - 120) / 30) ** 2 + ((yy - 50) / 30) ** 2 <= 1] = True
    iou = (truth & (fg > 0.5)).sum() / (truth | (fg > 0.5)).sum()
    assert iou > 0.7
    [prepared] = prepare_photos([str(path)], 64, segmenter=tmp_path / "absent.onnx")
    assert prepared.photo.size == (64, 64) and prepared.mask.size == (64, 64)
    red = np.asarray(prepared.photo)[..., 0] > 150
    assert red.mean() > 0.3  # cropped around the disk, not the whole green frame
    assert np.asarray(prepared.mask)[red].mean() > 200


def test_a_small_subject_is_cropped_at_native_size_not_blown_up(tmp_path):
    """Upscaling a small subject to the model's size would teach it blurred and larger than life."""
    whole = disk_photo(tmp_path / "whole.png", size=(64, 64), box=(6, 30, 30, 54))
    [prepared] = prepare_photos([str(whole)], 64, segmenter=tmp_path / "absent.onnx")
    assert np.array_equal(np.asarray(prepared.photo), np.asarray(load_photo(whole)))  # the photo as it is
    cut_out = Image.new("RGBA", (400, 300), (0, 0, 0, 0))  # its alpha is the mask: no GrabCut guesswork
    ImageDraw.Draw(cut_out).ellipse((300, 200, 330, 230), fill=(210, 30, 30, 255))
    cut_out.save(tmp_path / "large.png")
    [prepared] = prepare_photos([str(tmp_path / "large.png")], 64)
    red = np.asarray(prepared.photo)[..., 1] < 100
    assert 0.15 < red.mean() < 0.2  # a 64-px crop around the 30-px disk (π·15² / 64² ≈ 0.17), not resampled


def _tiny_onnx(path: Path) -> Path:
    """A 'segmenter' that calls bright pixels foreground: logits = 8·(mean over RGB − 0.5)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["m", "half"], ["c"]),
        helper.make_node("Mul", ["c", "gain"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32, 32])],
        initializer=[
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_segmenter_is_used_when_present(tmp_path, monkeypatch):
    model = _tiny_onnx(tmp_path / "seg.onnx")
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((50, 0, 99, 99), fill=(255, 255, 255))
    segmenter = OnnxSegmenter(model)
    assert segmenter.size == (32, 32)
    prob = segmenter(image)  # (100, 100)
    assert prob.shape == (100, 100) and prob[:, 80:].mean() > 0.9 and prob[:, :20].mean() < 0.1
    monkeypatch.setenv("TROUPE_SEGMENTER", str(model))
    assert isinstance(find_segmenter(), OnnxSegmenter)
    image.save(tmp_path / "half.png")
    [prepared] = prepare_photos([str(tmp_path / "half.png")], 64)
    mask = np.asarray(prepared.mask)  # (64, 64)
    # the segmenter's soft sigmoid(±4) values (GrabCut would give hard 0/255): left dark, right bright
    assert abs(int(mask[:, :20].mean()) - 4) <= 2 and abs(int(mask[:, -20:].mean()) - 250) <= 2
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="could not be loaded"):
        OnnxSegmenter(tmp_path / "broken.onnx")


def test_cut_out_photo_uses_its_alpha_as_the_mask(tmp_path):
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((20, 20, 59, 59), fill=(10, 20, 200, 255))
    image.save(tmp_path / "cut.png")
    assert load_photo(tmp_path / "cut.png").getpixel((0, 0)) == (255, 255, 255)  # composited on white
    [prepared] = prepare_photos([str(tmp_path / "cut.png")], 64)
    mask = np.asarray(prepared.mask) > 127
    blue = np.asarray(prepared.photo)[..., 0] < 100  # the blue square (the background is white)
    assert mask.mean() > 0.35 and (mask == blue).mean() > 0.9  # (resampling blurs a 1-px edge)


def test_the_segmenter_runs_on_cuda_only_where_onnxruntime_gpu_and_a_gpu_are_there():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert segmenter_providers(gpu_build, cuda=True) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert segmenter_providers(gpu_build, cuda=False) == ["CPUExecutionProvider"]
    assert segmenter_providers(["CPUExecutionProvider"], cuda=True) == ["CPUExecutionProvider"]
