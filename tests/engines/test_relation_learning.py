"""Learned relations (engines/relations/, engines/loras.py): examples checked before any work, training that
changes pictures only while its relation is asked for, a library whose exports load in plain diffusers and in
kohya's format, LoRAs for another model refused, and a killed training that leaves no half relation."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engines.relations.examples import mask_keypoints, read_examples
from engines.relations.keypoint_loss import keypoint_matching_loss, predicted_clean
from engines.service import Studio
from engines.types import Cancelled, GenerateRequest, InputError, LoraRef, ModelSpec, RelationTrainRequest

PROMPT = "a red box leaning on a blue tent"


def write_examples(folder, count: int = 3, edit=None):
    """A red block tilted against a blue one, a little differently each time; `edit` changes relation.json."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for i in range(count):
        pixels = np.full((64, 64, 3), (110, 170, 90), np.uint8)
        pixels[20:60, 36:60] = (40, 70, 210)
        for row in range(10, 60):  # a parallelogram leaning right
            shift = (row - 10) // 5
            pixels[row, 8 + i + shift : 26 + i + shift] = (215, 40, 40)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        red = {"phrase": "red box", "box": [(8 + i) / 64, 10 / 64, (36 + i) / 64, 60 / 64]}
        blue = {"phrase": "blue tent", "box": [36 / 64, 20 / 64, 60 / 64, 60 / 64], "keypoints": [[0.75, 0.6]]}
        examples.append({"image": f"{i:02d}.png", "prompt": f"{PROMPT} on grass", "objects": [red, blue]})
    data = {"relation": "leaning on", "template": "{a} leaning on {b}", "examples": examples}
    if edit is not None:
        edit(data)
    (folder / "relation.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def taught(tiny_sd15_dir, tmp_path_factory):
    """A studio over the tiny SD 1.5 with 'leaning on' learned (few steps: plumbing, not quality)."""
    root = tmp_path_factory.mktemp("relations")
    studio = Studio(ModelSpec(str(tiny_sd15_dir)), root / "library")
    request = GenerateRequest(PROMPT, seed=3, steps=3)
    plain = np.asarray(studio.generate(request).images[0])
    studio.teach_relation(RelationTrainRequest("leaning on", str(write_examples(root / "examples")), steps=12))
    return studio, request, plain, root


def test_examples_are_read_with_masks_and_keypoints_filled_in(tmp_path):
    examples = read_examples(write_examples(tmp_path / "ex"))
    assert examples.words == "leaning on" and len(examples.examples) == 3
    red, blue = examples.examples[0].objects
    assert red.mask.shape == (64, 64) and red.mask[30, 20] > 0.5 and red.mask[5, 5] < 0.5  # found inside its box
    assert len(red.keypoints) == 5 and blue.keypoints == ((0.75, 0.6),)  # from its mask / as given
    assert examples.relation.template == "{a} leaning on {b}" and examples.relation.layers == (1, 0)


def _drop_object(data):
    data["examples"][1]["objects"].pop()


def _box_outside(data):
    data["examples"][0]["objects"][0]["box"] = [0.5, 0.5, 1.4, 0.9]


def _no_examples(data):
    data["examples"] = []


def _escape(data):
    data["examples"][2]["image"] = "../02.png"


def _phrase_not_in_prompt(data):
    data["examples"][0]["objects"][1]["phrase"] = "green star"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_object, "example 01.png: needs exactly 2 objects"),
        (_box_outside, "example 00.png, object a: "),
        (_no_examples, "3–20 examples (found 0)"),
        (_escape, "image must be a file name in the examples' folder"),
        (_phrase_not_in_prompt, "must be words of the example's prompt"),
    ],
)
def test_bad_examples_are_one_line_naming_the_example(tmp_path, edit, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_examples(write_examples(tmp_path / "ex", edit=edit))


def test_an_unreadable_image_and_a_tricky_name_change_nothing(taught, tmp_path):
    studio, *_ = taught
    folder = write_examples(tmp_path / "ex")
    (folder / "01.png").write_bytes(b"not a png at all")
    before = sorted(p.name for p in studio.relation_library.root.rglob("*"))
    with pytest.raises(InputError, match="photo 01.png: not an image"):
        studio.teach_relation(RelationTrainRequest("other", str(folder), steps=2))
    with pytest.raises(InputError, match="relation name '../x' is not allowed"):
        RelationTrainRequest("../x", str(folder))
    assert sorted(p.name for p in studio.relation_library.root.rglob("*")) == before


def test_a_relation_applies_only_while_asked_for(taught):
    studio, request, plain, _ = taught
    assert [r.name for r in studio.learned_relations()] == ["leaning on"]
    after_training = np.asarray(studio.generate(request).images[0])
    related = studio.generate(GenerateRequest(PROMPT, seed=3, steps=3, relation="leaning on", relation_scale=4.0))
    after_relation = np.asarray(studio.generate(request).images[0])
    assert np.array_equal(after_training, plain) and np.array_equal(after_relation, plain)  # bit for bit
    assert np.abs(np.asarray(related.images[0]).astype(int) - plain).mean() > 0.5
    assert json.loads(related.images[0].info["troupe"])["request"]["relation"] == "leaning on"
    assert "Troupe relation: leaning on (4)" in related.images[0].info["parameters"]
    assert "leaning on" in studio.relations() and studio.relations()["leaning on"].lora is not None


def test_exports_load_in_diffusers_and_kohya_format_and_import_back(taught, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    studio, _, _, root = taught
    related = np.asarray(
        studio.generate(GenerateRequest(PROMPT, seed=3, steps=3, relation="leaning on", relation_scale=2.0)).images[0]
    )
    for fmt in ("diffusers", "kohya"):
        path = studio.export_relation("leaning on", root / f"leaning-{fmt}.safetensors", fmt)
        as_lora = GenerateRequest(PROMPT, seed=3, steps=3, loras=(LoraRef(str(path), 2.0),))
        assert np.array_equal(np.asarray(studio.generate(as_lora).images[0]), related), fmt
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(str(root / "leaning-diffusers.safetensors"))
    assert any("lora_A" in name for name, _ in pipe.unet.named_parameters())
    imported = studio.import_relation(root / "leaning-kohya.safetensors", "leaning too")
    assert imported.template == "{a} leaning on {b}"
    with pytest.raises(InputError, match="already exists"):
        studio.import_relation(root / "leaning-kohya.safetensors", "Leaning Too")  # the same folder on macOS
    studio.delete_relation("leaning too")


def test_a_lora_for_another_family_is_refused_naming_both(taught, tmp_path):
    studio, *_ = taught
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "xl.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(16, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))  # fmt: skip
    with pytest.raises(InputError, match="is for SDXL; the loaded model is SD 1.5"):
        studio.generate(GenerateRequest(PROMPT, steps=1, loras=(LoraRef(str(path)),)))
    with pytest.raises(InputError, match="no such .safetensors file"):
        studio.generate(GenerateRequest(PROMPT, steps=1, loras=(LoraRef(str(tmp_path / "gone.safetensors")),)))


def test_a_cancelled_training_leaves_no_half_relation_and_resumes(taught, tmp_path):
    studio, *_ = taught
    folder = write_examples(tmp_path / "ex")
    cancel, seen = threading.Event(), []

    def stop_after_three(progress):
        seen.append(progress.step)
        if progress.step == 3:
            cancel.set()

    request = RelationTrainRequest("resumed", str(folder), steps=6)
    with pytest.raises(Cancelled):
        studio.teach_relation(request, on_progress=stop_after_three, cancel=cancel)
    assert "resumed" not in [r.name for r in studio.learned_relations()]
    assert (studio.relation_library.work_dir("resumed") / "state.json").is_file()
    info = studio.teach_relation(request, on_progress=lambda p: seen.append(p.step))
    assert seen == [1, 2, 3, 4, 5, 6] and len(info.loss_curve) == 6
    assert not studio.relation_library.work_dir("resumed").exists()
    studio.delete_relation("resumed")


def test_keypoint_matching_loss_reads_the_predicted_clean_latent_at_the_keypoints():
    clean = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    alphas = torch.tensor([0.9, 0.3])
    noisy = alphas.sqrt().view(-1, 1, 1, 1) * clean + (1 - alphas).sqrt().view(-1, 1, 1, 1) * noise
    assert torch.allclose(predicted_clean(noisy, noise, alphas, "epsilon"), clean, atol=1e-5)  # Eq. 5
    points = torch.rand(2, 2, 3, 2)
    valid, active = torch.ones(2, 2, 3, dtype=torch.bool), torch.tensor([True, False])
    own = clean[:, None].expand(-1, 2, -1, -1, -1)
    assert keypoint_matching_loss(clean, own, points, points, valid, active) < 1e-10
    assert keypoint_matching_loss(clean + 1, own, points, points, valid, active) == pytest.approx(4.0)  # 4 channels
    shifted = own.clone()
    shifted[1] += 5  # only the inactive sample (t > T/3) differs: no loss
    assert keypoint_matching_loss(clean, shifted, points, points, valid, active) < 1e-10


def test_keypoints_from_a_mask_are_its_centre_and_its_ends():
    mask = np.zeros((32, 32), np.float32)
    mask[10:14, 4:28] = 1  # a bar: its ends are at x = 4 and x = 28
    centre, right, left, *_ = mask_keypoints(mask)
    assert centre == pytest.approx((16 / 32, 12 / 32), abs=0.02)
    assert right[0] > 0.85 and left[0] < 0.15


def test_the_command_line_teaches_lists_exports_and_generates_with_a_relation(tiny_sd15_dir, tmp_path, capsys):
    from studio.__main__ import main

    model, library = ["--model", str(tiny_sd15_dir)], ["--library", str(tmp_path / "lib")]
    folder = write_examples(tmp_path / "ex")
    assert main(["relations", "train", *model, *library, "--name", "leans", "--exemplars", str(folder),
                 "--steps", "3", "--no-keypoints"]) == 0  # fmt: skip
    assert "learned 'leans' ({a} leaning on {b}) from 3 examples" in capsys.readouterr().out
    assert main(["relations", "list", *library]) == 0
    assert "leans" in capsys.readouterr().out.splitlines()[1]
    kohya = tmp_path / "leans.safetensors"
    assert main(["relations", "export", "leans", "--out", str(kohya), "--format", "kohya", *library]) == 0
    out = tmp_path / "pair.png"
    assert main(["generate", *model, *library, "--relation", "leans", "--pair", "red box", "blue tent",
                 "--prompt", "on grass", "--steps", "2", "--seed", "1", "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(Image.open(out).info["troupe"])["request"]
    assert saved["prompt"] == "red box leaning on blue tent on grass" and saved["relation"] == "leans"
    assert [r["phrase"] for r in saved["layout"]["regions"]] == ["red box", "blue tent"]
    with_file = tmp_path / "lora.png"
    assert main(["generate", *model, *library, "--prompt", PROMPT, "--lora", f"{kohya}:0.5", "--steps", "2",
                 "--out", str(with_file)]) == 0  # fmt: skip
    assert json.loads(Image.open(with_file).info["troupe"])["request"]["loras"] == [{"path": str(kohya), "scale": 0.5}]
    assert main(["generate", *model, *library, "--prompt", "x", "--relation", "nope", "--out", str(out)]) == 2
    assert "unknown relation 'nope'" in capsys.readouterr().err


def test_the_keypoint_loss_follows_the_family_unless_asked_for(taught):
    from engines.types import keypoint_weight

    studio, *_ = taught
    assert studio.learned_relations()[0].keypoint_weight == 0.1  # an SD model keeps DreamRelation's weight
    assert keypoint_weight("demo") == 0.0 and keypoint_weight("sdxl") == 0.1  # the demo bench chose none
    assert keypoint_weight("demo", "on") == 0.1 and keypoint_weight("sd15", "off") == 0.0
    with pytest.raises(InputError, match="keypoints must be one of auto, on, off"):
        keypoint_weight("sd15", "maybe")
