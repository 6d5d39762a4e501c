"""The reference adapter (engines/reference_adapter.py, engines/reference_training.py) and its dataset
(engines/reference_dataset.py): safetensors only, no effect when references are off, training that saves and
resumes, a dataset that resumes and rejects what it did not write."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engines.models import load_model
from engines.reference_adapter import AdapterSettings, add_adapter, has_adapter, load_adapter, save_adapter
from engines.reference_dataset import DatasetWriter, load_dataset
from engines.reference_training import TrainSettings, train_adapter
from engines.service import Studio
from engines.types import (
    Cancelled,
    GenerateRequest,
    InputError,
    Layout,
    ModelSpec,
    ReferenceConfig,
    Region,
    RegisterRequest,
)
from tests.tiny_models import subject_photos

PROMPT = "a photo of <rex> on the beach"
LAYOUT = Layout((Region("", (0.1, 0.2, 0.6, 0.8), subject="rex"),))
COLOURS = ((215, 40, 40), (40, 60, 215), (240, 200, 30), (30, 160, 60))


def write_dataset(root, objects: int = 4, views: int = 3, size: int = 32) -> None:
    """Discs of one colour per object, at a different place in each view."""
    writer = DatasetWriter(root, "test shapes", size)
    for index in range(len(writer), objects):
        images, masks = [], []
        for view in range(views):
            image, mask = Image.new("RGB", (size, size), (120, 120, 120)), Image.new("L", (size, size), 0)
            box = (2 + 4 * view, 4, 18 + 4 * view, 20)
            ImageDraw.Draw(image).ellipse(box, fill=COLOURS[index % len(COLOURS)])
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            images.append(image)
            masks.append(mask)
        writer.add("ball", images, masks, ["a ball on grey"] * views)


@pytest.fixture(scope="module")
def adapter_file(tiny_sd15_dir, tmp_path_factory):
    """A tiny sd15 adapter whose LoRA does something (random B, where a fresh one starts at zero)."""
    bundle = load_model(ModelSpec(str(tiny_sd15_dir)))
    add_adapter(bundle.pipe.unet, AdapterSettings(rank=4, alpha=4.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in bundle.pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(bundle.pipe.unet, path, AdapterSettings(rank=4, alpha=4.0), {"trained_on": "nothing (a test)"})
    return path


def test_the_adapter_loads_from_safetensors_only_and_must_fit_the_model(tiny_sd15_dir, sdxl, adapter_file, tmp_path):
    bundle = load_model(ModelSpec(str(tiny_sd15_dir)))
    pickle = tmp_path / "adapter.bin"
    pickle.write_bytes(adapter_file.read_bytes())
    with pytest.raises(InputError, match="not a .safetensors file"):
        load_adapter(bundle.pipe.unet, pickle)
    foreign = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="not a Troupe reference adapter"):
        load_adapter(bundle.pipe.unet, foreign)
    with pytest.raises(InputError, match="does not fit"):
        load_adapter(sdxl.pipe.unet, adapter_file)  # SD 1.5's self-attention widths are not SDXL's
    assert not has_adapter(sdxl.pipe.unet) and not has_adapter(bundle.pipe.unet)  # nothing left half-attached
    assert load_adapter(bundle.pipe.unet, adapter_file) == {"trained_on": "nothing (a test)"}
    assert has_adapter(bundle.pipe.unet)


def test_an_attached_adapter_acts_only_when_references_are_read(tiny_sd15_dir, adapter_file, tmp_path):
    plain = _studio(tiny_sd15_dir, tmp_path / "plain", "none")
    adapted = _studio(tiny_sd15_dir, tmp_path / "adapted", str(adapter_file))

    def image(studio, **references):
        request = GenerateRequest(PROMPT, layout=LAYOUT, seed=5, steps=3, references=ReferenceConfig(**references))
        return np.asarray(studio.generate(request).images[0], np.int16)

    assert np.array_equal(image(plain, enabled=False), image(adapted, enabled=False))
    assert np.array_equal(image(plain, strength=0.0), image(adapted, strength=0.0))
    assert np.array_equal(image(plain), image(adapted, adapter=False))  # the switch turns it off
    assert not np.array_equal(image(plain), image(adapted))  # and on, it acts


def _studio(model_dir, folder, adapter: str) -> Studio:
    folder.mkdir()
    studio = Studio(ModelSpec(str(model_dir), reference_adapter=adapter), folder / "library")
    studio.register(RegisterRequest("rex", "dog", tuple(subject_photos(folder, "rex", 1)), preset="instant"))
    return studio


def test_a_dataset_resumes_and_a_foreign_folder_is_refused(tmp_path):
    write_dataset(tmp_path / "data", objects=2)
    write_dataset(tmp_path / "data", objects=3)  # continues: object 2 is added, 0 and 1 are kept
    dataset = load_dataset(tmp_path / "data")
    assert len(dataset.objects) == 3 and dataset.objects[2].images[0] == "000002/0.png"
    image, mask = dataset.image(2, 1)
    assert image.mode == "RGB" and mask.mode == "L" and image.size == (32, 32)
    with pytest.raises(InputError, match="holds a dataset of test shapes"):
        DatasetWriter(tmp_path / "data", "demo world", 32)
    with pytest.raises(InputError, match="dataset.json is missing"):
        load_dataset(tmp_path / "nothing")
    index = tmp_path / "data" / "dataset.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "version": 9}))
    with pytest.raises(InputError, match="version-1"):
        load_dataset(tmp_path / "data")


def test_training_saves_the_adapter_with_its_card_and_resumes_where_it_stopped(tiny_sd15_dir, tmp_path):
    write_dataset(tmp_path / "data", objects=5)
    dataset, out = load_dataset(tmp_path / "data"), tmp_path / "adapter.safetensors"
    settings = TrainSettings(steps=4, batch=2, learning_rate=1e-2, rank=4, save_every=2, validation_share=0.2)
    card = train_adapter(load_model(ModelSpec(str(tiny_sd15_dir))), dataset, out, settings)
    assert card["step"] == 4 and set(card["validation_loss"]) == {"no references", "references",
                                                                  "references + adapter"}  # fmt: skip
    trained = _lora_b(out)
    assert trained and all(float(v.abs().max()) > 0 for v in trained.values())  # B starts at zero: it learned
    steps = []
    card = train_adapter(load_model(ModelSpec(str(tiny_sd15_dir))), dataset, out,
                         TrainSettings(**{**settings.__dict__, "steps": 6}), lambda p: steps.append(p.step))  # fmt: skip
    assert steps == [5, 6] and card["step"] == 6  # from the saved step 4, not from 0
    bundle = load_model(ModelSpec(str(tiny_sd15_dir), reference_adapter=str(out)))
    assert has_adapter(bundle.pipe.unet)  # what training writes, generation loads


def test_a_cancelled_training_keeps_the_last_saved_adapter(tiny_sd15_dir, tmp_path):
    write_dataset(tmp_path / "data", objects=4)
    out, cancel = tmp_path / "adapter.safetensors", threading.Event()
    settings = TrainSettings(steps=10, batch=2, rank=4, save_every=1, validation_share=0.25)

    def stop_after_two(progress):
        if progress.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        train_adapter(load_model(ModelSpec(str(tiny_sd15_dir))), load_dataset(tmp_path / "data"), out, settings,
                      stop_after_two, cancel)  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["card"])["step"] == 2


def _lora_b(path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if "lora_B" in k}


def test_the_demo_models_adapter_waits_for_the_first_picture_that_reads_photos(tmp_path):
    """Loading the demo model stays as fast as before the adapter: peft and the LoRA come with the first request
    that reads photos, and a request that reads none leaves them out."""
    studio = Studio(ModelSpec("demo"), tmp_path / "library")
    assert studio.bundle.pending_adapter is not None and not has_adapter(studio.bundle.pipe.unet)
    studio.register(RegisterRequest("rex", "ball", tuple(subject_photos(tmp_path, "rex", 1)), preset="instant"))
    studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=1, steps=2, references=ReferenceConfig(False)))
    assert not has_adapter(studio.bundle.pipe.unet)
    studio.generate(GenerateRequest(PROMPT, layout=LAYOUT, seed=1, steps=2))
    assert has_adapter(studio.bundle.pipe.unet)
