"""PNG metadata with the ecosystem: every sampler name and the model hash written as A1111 writes them (and read
back by the third-party reader sd-parsers), and A1111's and ComfyUI's own PNGs opened as a starting request."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
from PIL import Image, PngImagePlugin

from engines.metadata import CHUNK, model_hash, model_name, png_info, save_png
from engines.png_import import open_png
from engines.types import SCHEDULERS, GenerateRequest, InputError, ModelSpec

A1111_TEXT = (
    "a (cozy:1.2) cabin in the woods, <lora:snowy:0.8>, winter\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "snowy: 0a1b2c3d4e5f", '
    "Version: v1.10.1"
)


def fake_bundle(source: str, scheduler: object = None) -> SimpleNamespace:
    """What png_info reads of a loaded model (a real load is not needed to write metadata)."""
    pipe = SimpleNamespace(scheduler=scheduler)
    return SimpleNamespace(spec=ModelSpec(source), family="sd15", fingerprint="0" * 16, native_size=512, pipe=pipe)


def png_with(tmp_path, **chunks: str):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def write(tmp_path, request: GenerateRequest, bundle) -> object:
    image = Image.new("RGB", (8, 8))
    image.info.update(png_info(request, bundle))
    return save_png(image, tmp_path / "out.png")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "my-model.safetensors"
    path.write_bytes(b"not really weights, but hashed all the same" * 100)
    return path


@pytest.mark.parametrize("key", [k for k in SCHEDULERS if k != "default"])
def test_every_sampler_round_trips_through_the_a1111_text(tmp_path, checkpoint, key):
    """Written by its A1111 name, read back as the same sampler (the A1111 reader ignores Troupe's own chunk)."""
    request = GenerateRequest("a red ball", seed=7, steps=12, cfg=5.0, scheduler=key, width=512, height=512)
    info = png_info(request, fake_bundle(str(checkpoint)))
    assert f"Sampler: {SCHEDULERS[key].title}," in info["parameters"]
    opened = open_png(png_with(tmp_path, parameters=info["parameters"]))
    assert (opened.maker, opened.request.scheduler, opened.request.seed) == ("A1111", key, 7)


def test_default_writes_the_models_own_sampler(tmp_path, checkpoint):
    from diffusers import PNDMScheduler

    own = PNDMScheduler(skip_prk_steps=True)  # what SD 1.5 ships
    info = png_info(GenerateRequest("a red ball", seed=1), fake_bundle(str(checkpoint), own))
    assert "Sampler: PLMS," in info["parameters"]
    assert open_png(png_with(tmp_path, parameters=info["parameters"])).request.scheduler == "pndm"
    assert json.loads(info[CHUNK])["request"]["scheduler"] == "default"  # the request itself stays "default"


def test_model_hash_is_a1111s_short_sha256_of_a_checkpoint(checkpoint):
    assert model_hash(str(checkpoint)) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert model_name(str(checkpoint)) == "my-model"  # the name, never the person's whole path


def test_model_hash_of_a_folder_follows_its_components(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"1234")
    (folder / "README.md").write_text("not part of the model")
    first = model_hash(str(folder))
    (folder / "README.md").write_text("edited")
    assert model_hash(str(folder)) == first and len(first) == 10
    (folder / "unet" / "weights.safetensors").write_bytes(b"12345")
    assert model_hash(str(folder)) != first
    assert model_hash("demo") == model_hash("demo") is not None


def test_model_hash_of_a_hub_model_is_its_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--a-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_hash("someone/a-model") == commit[:10]
    assert model_hash("someone/not-cached") is None
    assert model_name("someone/a-model") == "someone/a-model"


def test_an_a1111_png_opens_as_a_request(tmp_path):
    opened = open_png(png_with(tmp_path, parameters=A1111_TEXT))
    request = opened.request
    assert opened.maker == "A1111"
    assert request.prompt == "a (cozy:1.2) cabin in the woods, , winter"  # the LoRA tag is taken out and named
    assert request.negative_prompt == "blurry, lowres"
    assert (request.steps, request.cfg, request.seed) == (28, 6.5, 1234567)
    assert (request.width, request.height, request.scheduler) == (512, 768, "dpmpp_2m_karras")
    assert any("v1-5-pruned-emaonly" in d for d in opened.dropped)
    assert any(d.startswith("lora snowy (0.8)") for d in opened.dropped)
    assert "Clip skip: 2" in opened.dropped
    assert not any("Version" in d or "Schedule type" in d for d in opened.dropped)
    assert opened.note.startswith("Not carried over from the A1111 settings: ") and "\n" not in opened.note


def test_older_a1111_names_and_values_troupe_refuses(tmp_path):
    text = "a dog\nSteps: 400, Sampler: DPM++ 2M SDE Exponential, CFG scale: 7, Seed: 5, Size: 500x512"
    opened = open_png(png_with(tmp_path, parameters=text))
    assert (opened.request.scheduler, opened.request.steps, opened.request.width) == ("default", 20, None)
    assert opened.request.seed == 5
    assert any("DPM++ 2M SDE Exponential" in d for d in opened.dropped)
    assert any(d.startswith("steps 400") for d in opened.dropped)
    assert any(d.startswith("width 500") for d in opened.dropped)
    old_style = "a dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512"
    assert open_png(png_with(tmp_path, parameters=old_style)).request.scheduler == "dpmpp_2m_karras"


def comfyui_graph() -> dict:
    """ComfyUI's default text-to-image graph (as its Save Image node writes it), plus a LoRA and a hires pass."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": ["12", 0],
                "steps": 25,
                "cfg": 8.0,
                "sampler_name": "euler_ancestral",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["10", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["10", 1]}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "film.safetensors", "strength_model": 0.7}},
        "11": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 10,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 0.5,
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["13", 0],
            },
        },  # fmt: skip
        "12": {"class_type": "PrimitiveNode", "inputs": {"value": 987654}},
        "13": {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0]}},
    }


def test_a_comfyui_png_opens_as_a_request(tmp_path):
    path = png_with(tmp_path, prompt=json.dumps(comfyui_graph()), workflow=json.dumps({"nodes": []}))
    opened = open_png(path)
    request = opened.request
    assert opened.maker == "ComfyUI"
    assert (request.prompt, request.negative_prompt) == ("a lighthouse at dusk", "text, watermark")
    assert (request.seed, request.steps, request.cfg, request.scheduler) == (987654, 25, 8.0, "euler_a")
    assert (request.width, request.height, request.num_images) == (832, 1216, 2)
    assert any("sd_xl_base_1.0.safetensors" in d for d in opened.dropped)
    assert any("film.safetensors" in d for d in opened.dropped)
    assert any("1 more sampler pass" in d for d in opened.dropped)


def test_comfyui_karras_schedule_picks_the_karras_sampler(tmp_path):
    graph = comfyui_graph()
    graph["3"]["inputs"].update(sampler_name="dpmpp_2m", scheduler="karras")
    assert open_png(png_with(tmp_path, prompt=json.dumps(graph))).request.scheduler == "dpmpp_2m_karras"


@pytest.mark.parametrize(
    "chunks, message",
    [
        ({}, "no settings Troupe can read"),
        ({"prompt": "{not json"}, "ComfyUI graph is damaged"),
        ({"prompt": json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}})}, "no KSampler node"),
        ({CHUNK: "{}"}, "Troupe settings are damaged"),
    ],
)
def test_unreadable_pngs_are_one_line(tmp_path, chunks, message):
    with pytest.raises(InputError, match=message):
        open_png(png_with(tmp_path, **chunks))


@pytest.mark.parametrize("key", ["default", "ddim", "dpmpp_2m", "pndm", "euler_a", "lms"])
def test_troupe_pngs_with_old_scheduler_keys_still_open(tmp_path, key):
    request = GenerateRequest("a red ball", seed=3).to_dict() | {"scheduler": key}
    chunk = json.dumps({"version": 2, "request": request, "model": {"source": "demo"}})
    opened = open_png(png_with(tmp_path, **{CHUNK: chunk, "parameters": "ignored when Troupe's chunk is there"}))
    assert (opened.maker, opened.request.scheduler, opened.dropped) == ("Troupe", key, ())


@pytest.mark.parametrize("key", ["dpmpp_2m_karras", "euler_a", "unipc"])
def test_sd_parsers_reads_back_what_troupe_wrote(tmp_path, checkpoint, key):
    """The third-party reader sd-parsers (pip install sd-parsers) finds every A1111 field as written."""
    sd_parsers = pytest.importorskip("sd_parsers")
    request = GenerateRequest("a red ball on a table", negative_prompt="blurry", seed=4242, steps=17, cfg=6.5,
                              scheduler=key, width=512, height=768)  # fmt: skip
    path = write(tmp_path, request, fake_bundle(str(checkpoint)))
    info = sd_parsers.ParserManager().parse(str(path))
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in sampler.prompts] == [request.prompt]
    assert [p.value for p in sampler.negative_prompts] == [request.negative_prompt]
    assert sampler.name == SCHEDULERS[key].title
    assert sampler.parameters["seed"] == "4242" and sampler.parameters["steps"] == "17"
    assert sampler.parameters["cfg_scale"] == "6.5"
    assert info.metadata["Size"] == "512x768"
    assert sampler.model.hash == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert sampler.model.name == "my-model"


def test_a_comfyui_png_with_only_its_workflow_opens(tmp_path):
    """The editor's graph: widget values by position, inputs by link id."""
    workflow = {
        "nodes": [
            {"id": 3, "type": "KSampler", "widgets_values": [31337, "randomize", 12, 6.0, "dpmpp_2m", "karras", 1],
             "inputs": [{"name": "positive", "link": 4}, {"name": "negative", "link": 6},
                        {"name": "latent_image", "link": 2}]},
            {"id": 5, "type": "EmptyLatentImage", "widgets_values": [768, 512, 1]},
            {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a fox in snow"]},
            {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["blurry"]},
        ],
        "links": [[2, 5, 0, 3, 3, "LATENT"], [4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"]],
    }  # fmt: skip
    request = open_png(png_with(tmp_path, workflow=json.dumps(workflow))).request
    assert (request.prompt, request.negative_prompt, request.seed, request.steps) == (
        "a fox in snow",
        "blurry",
        31337,
        12,
    )
    assert (request.cfg, request.scheduler, request.width, request.height) == (6.0, "dpmpp_2m_karras", 768, 512)
    with pytest.raises(InputError, match="ComfyUI workflow is damaged"):
        open_png(png_with(tmp_path, workflow='{"nodes": [{"type": "KSampler"}]}'))
