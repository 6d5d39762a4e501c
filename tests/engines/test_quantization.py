"""Quantization end to end on the CPU: the demo model's UNet in int8 (torchao, weight-only) generates close to the
float model, registers a subject (through float copies of the encoders when those are quantized too) and takes
LoRAs; bitsandbytes' CUDA-only rows are one line on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from engines.generate import Generator
from engines.library import SubjectLibrary
from engines.loras import applied, lora_updates
from engines.models import is_quantized, load_model
from engines.prompt_subjects import gather_subjects
from engines.register import register_subject
from engines.types import GenerateRequest, InputError, Layout, LoraRef, ModelSpec, Region, RegisterRequest

pytest.importorskip("torchao")
torch.set_num_threads(1)

LAYOUT = Layout((Region("red box", (0.05, 0.3, 0.5, 0.9)), Region("blue ball", (0.5, 0.2, 0.95, 0.8), layer=1)))
REQUEST = GenerateRequest("a red box and a blue ball", layout=LAYOUT, seed=1, steps=6)
# Mean absolute difference per channel, out of 255. Int8 weight-only rounds each output channel's weights to 1/127
# of its largest, which moves the demo model's images by 0.3-4 (10 and 20 steps, seeds 0-2, two regions), while two
# seeds of the float model differ by 38-78: 8 allows twice the worst measured drift and is still 5x below "another
# picture". Single pixels can differ by ~200 where an edge moves by one pixel, so the maximum is not a useful bound.
MEAN_TOLERANCE = 8.0


def demo(quantization: str = "none"):
    return load_model(ModelSpec("demo", quantization=quantization, device="cpu", reference_adapter="none"))


@pytest.fixture(scope="module")
def float_bundle():
    return demo()


@pytest.fixture(scope="module")
def int8_bundle():
    return demo("torchao-int8")


def pixels(bundle, request: GenerateRequest = REQUEST) -> np.ndarray:
    return np.asarray(Generator(bundle)(request).images[0], dtype=np.float64)


def test_only_the_unet_is_quantized_and_subjects_still_fit(float_bundle, int8_bundle):
    assert is_quantized(int8_bundle.pipe.unet)
    assert not any(is_quantized(e) for e in int8_bundle.text_encoders)
    assert int8_bundle.fingerprint == float_bundle.fingerprint  # subjects registered on either work on both


def test_quantized_unet_generates_close_to_the_float_model(float_bundle, int8_bundle):
    reference, quantized = pixels(float_bundle), pixels(int8_bundle)
    assert 0 < np.abs(reference - quantized).mean() < MEAN_TOLERANCE


def test_registration_with_quantized_text_encoders_trains_float_copies(tmp_path, float_bundle):
    bundle = demo("torchao-int8-all")
    assert all(is_quantized(e) for e in bundle.text_encoders)
    photos = []
    for i in range(2):
        image = Image.new("RGB", (72, 64), (40, 140, 40))
        ImageDraw.Draw(image).ellipse((10 + 4 * i, 10, 50 + 4 * i, 50), fill=(200, 30, 30))
        image.save(tmp_path / f"p{i}.png")
        photos.append(str(tmp_path / f"p{i}.png"))
    library = SubjectLibrary(tmp_path / "lib")
    short = {"steps": 2, "batch": 1, "reg_batch": 2, "reg_pool": 16, "delta_sentences": 16, "checkpoint_every": 0}
    info = register_subject(bundle, RegisterRequest("rex", "box", tuple(photos), preset="quick"), library,
                            overrides=short)  # fmt: skip
    assert info.fingerprint == float_bundle.fingerprint
    assert all(is_quantized(e) for e in bundle.text_encoders)  # the bundle's own encoders were not touched
    request = GenerateRequest("a photo of <rex>", seed=0, steps=2)
    subjects = gather_subjects(request.prompt, library, bundle.family, bundle.fingerprint)
    assert Generator(bundle)(request, subjects).images[0].size == (64, 64)


def lora_file(bundle, path) -> str:
    """A LoRA on the cross-attention's keys and values with random weights, in peft's key format."""
    generator, weights = torch.Generator().manual_seed(0), {}
    for name, module in bundle.pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            weights[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.15
            weights[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.15
    save_file(weights, str(path))
    return str(path)


def test_loras_merge_into_dequantized_weights_and_the_int8_ones_come_back(tmp_path, float_bundle, int8_bundle):
    path = lora_file(float_bundle, tmp_path / "lora.safetensors")
    plain = pixels(int8_bundle)
    before = {n: p for n, p in int8_bundle.pipe.unet.named_parameters()}
    outputs = {}
    for name, bundle in (("float", float_bundle), ("int8", int8_bundle)):
        with applied(bundle, lora_updates(bundle, [LoraRef(path)])):
            outputs[name] = pixels(bundle)
    assert np.abs(outputs["int8"] - plain).mean() > MEAN_TOLERANCE  # the LoRA changed the picture ...
    assert np.abs(outputs["int8"] - outputs["float"]).mean() < MEAN_TOLERANCE  # ... as it does on the float model
    after = dict(int8_bundle.pipe.unet.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # the very int8 tensors are back
    assert np.array_equal(pixels(int8_bundle), plain)


def test_cuda_only_quantization_on_a_cpu_names_the_cpu_backend():
    with pytest.raises(InputError, match="needs a CUDA GPU; on cpu use torchao-int8"):
        demo("nf4")
