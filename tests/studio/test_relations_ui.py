"""The Relations tab's handlers and the LoRA list, without a server: clicks become boxes, the example folder is
written byte for byte the same, bad examples are one line before anything is written, and GenerateForm carries the
relation's strength and the LoRAs both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.types import GenerateRequest, InputError, LoraRef
from studio.ui import relation_examples as rx
from studio.ui.forms import GenerateForm, RelationForm
from studio.ui.loras import added, check_uploaded, lora_refs, lora_rows

PROMPT = "a red box leaning on a blue tent on grass"


def pictures(folder: Path, count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.full((64, 64, 3), (110, 170, 90), np.uint8)
        pixels[20:60, 36:60] = (40, 70, 210)
        pixels[10:60, 8 + i : 30 + i] = (215, 40, 40)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        paths.append(str(folder / f"{i:02d}.png"))
    return paths


def annotated(files: list[str]) -> list[dict]:
    """What a person's clicks make: words on the first example copied to all, two boxes on each."""
    draft = rx.synced(files, []).draft
    rx.with_text(draft[0], PROMPT, "red box", "blue tent")
    rx.copied_to_all(draft, draft[0])
    for entry in draft:
        mode, pending = "box a", None
        for point in ((0.1, 0.15), (0.5, 0.95), (0.55, 0.3), (0.95, 0.95)):
            mode, pending = rx.clicked(entry, mode, pending, point)
    return draft


def test_clicks_make_boxes_and_keypoints_and_train_writes_the_same_bytes_twice(tmp_path):
    files = pictures(tmp_path / "up")
    draft = rx.synced(files, []).draft
    assert [e["image"] for e in draft] == ["00.png", "01.png", "02.png"]
    assert rx.summary(draft, "00.png").startswith("**0 of 3 examples ready**")
    mode, pending = rx.clicked(draft[0], "box a", None, (0.5, 0.9))  # the first corner waits for the second
    assert (mode, pending) == ("box a", [0.5, 0.9]) and "box" not in draft[0]["objects"][0]
    mode, pending = rx.clicked(draft[0], mode, pending, (0.1, 0.2))  # any two opposite corners
    assert (mode, pending, draft[0]["objects"][0]["box"]) == ("box b", None, [0.1, 0.2, 0.5, 0.9])
    assert rx.clicked(draft[0], "points b", None, (0.7, 0.6)) == ("points b", None)
    assert draft[0]["objects"][1]["keypoints"] == [[0.7, 0.6]]
    with pytest.raises(InputError, match="no size"):
        rx.clicked(draft[0], "box b", [0.3, 0.3], (0.3, 0.8))
    assert rx.fraction([96, 384], (384, 384)) == (0.25, 1.0)
    picture = rx.shown(files[0], draft[0])
    assert picture.size == (rx.DISPLAY, rx.DISPLAY) and picture.getpixel((38, 120)) == rx.COLOURS["a"]  # A's edge

    draft = annotated(files)
    form = RelationForm(name="leaning on", relation="leaning on", template="{a} leaning on {b}", examples=files,
                        annotations=rx.dump_draft(draft), steps=3, keypoints="off")  # fmt: skip
    request, folder = form.to_request(lambda name: tmp_path / "work" / name)
    assert (request.name, request.steps, request.keypoint_weight) == ("leaning on", 3, 0.0)
    assert request.exemplars == str(tmp_path / "work" / "leaning on")
    first = folder.write(tmp_path / "first")
    second = form.to_request(lambda name: tmp_path / "work" / name)[1].write(tmp_path / "second")
    assert sorted(p.name for p in first.iterdir()) == ["00.png", "01.png", "02.png", "relation.json"]
    for name in ("00.png", "relation.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()  # the engine's digest: resumable
    written = json.loads((first / "relation.json").read_text())
    assert written["examples"][0]["objects"][1] == {"phrase": "blue tent", "box": [0.55, 0.3, 0.95, 0.95]}


def _draft_without_box_b(files):
    draft = annotated(files)
    del draft[1]["objects"][1]["box"]
    return draft


def _phrase_not_in_prompt(files):
    draft = annotated(files)
    draft[2]["objects"][0]["phrase"] = "green star"
    return draft


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"annotations": lambda files: annotated(files)[:2]}, "3–20 example images (got 2)"),
        ({"annotations": _draft_without_box_b}, "example 01.png: the box of B: click two opposite corners"),
        ({"annotations": _phrase_not_in_prompt}, "example 02.png: object A 'green star' must be words of its prompt"),
        ({"template": "{a} leaning on"}, "the template needs {a} and {b} once each"),
        ({"relation": " "}, "name the relation in words"),
        ({"name": "../x"}, "relation name '../x' is not allowed"),
        ({"examples": lambda files: files[:2]}, "example 02.png: upload 02.png too"),
        ({"annotations": lambda files: "{not json"}, "annotations: not valid JSON"),
    ],
)
def test_bad_examples_are_one_line_before_anything_is_written(tmp_path, fields, message):
    files = pictures(tmp_path / "up")
    values = {"name": "leaning on", "relation": "leaning on", "template": "{a} leaning on {b}", "examples": files,
              "annotations": annotated(files)}  # fmt: skip
    for key, value in fields.items():
        values[key] = value(files) if callable(value) else value
    if not isinstance(values["annotations"], str):
        values["annotations"] = rx.dump_draft(values["annotations"])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RelationForm(**values).to_request(lambda name: tmp_path / "work" / name)
    assert not (tmp_path / "work").exists()


def test_a_ready_folder_fills_the_blank_examples_and_keeps_what_was_clicked(tmp_path):
    files = pictures(tmp_path / "up")
    mask = tmp_path / "up" / "00_a.png"
    Image.new("L", (64, 64), 255).save(mask)
    examples = [dict(entry) for entry in annotated(files)]
    examples[0]["objects"][0]["mask"] = "00_a.png"
    ready = tmp_path / "up" / "relation.json"
    ready.write_text(json.dumps({"relation": "leaning on", "template": "{a} leaning on {b}", "examples": examples}))
    result = rx.synced([str(ready), str(mask), *files], [])
    assert (result.relation, result.template) == ("leaning on", "{a} leaning on {b}")
    assert [e["image"] for e in result.draft] == ["00.png", "01.png", "02.png"]  # the mask is not an example
    assert rx.checked(result.relation, result.template, [str(ready), str(mask), *files], result.draft).files[:2] == (
        ("00.png", files[0]),
        ("00_a.png", str(mask)),
    )
    clicked = result.draft
    clicked[1]["objects"][0]["box"] = [0.2, 0.2, 0.4, 0.4]
    again = rx.synced([str(ready), str(mask), *files], clicked).draft
    assert again[1]["objects"][0]["box"] == [0.2, 0.2, 0.4, 0.4]  # an upload keeps the person's clicks
    with pytest.raises(InputError, match="two uploaded files are named 00.png"):
        rx.uploads([files[0], str(tmp_path / "elsewhere" / "00.png")])


# ------------------------------------------------------------------------------------------- the LoRA list
def test_the_lora_list_becomes_lora_refs_and_comes_back_from_a_request(tmp_path):
    rows = [["/models/style.safetensors", 0.7], ["", None], ["/models/face.safetensors", ""]]
    assert lora_refs(rows) == (LoraRef("/models/style.safetensors", 0.7), LoraRef("/models/face.safetensors", 1.0))
    assert lora_refs({"headers": ["file", "scale"], "data": rows[:1]}) == (LoraRef("/models/style.safetensors", 0.7),)
    assert lora_refs(None) == () and lora_refs([]) == ()
    with pytest.raises(InputError, match="safetensors files only"):
        lora_refs([["/models/style.ckpt", 1.0]])
    with pytest.raises(InputError, match="the scale must be a number"):
        lora_refs([["/models/style.safetensors", "strong"]])
    with pytest.raises(InputError, match="LoRA scale must be a number in -4..4"):
        lora_refs([["/models/style.safetensors", 9]])
    assert added("/up/style.safetensors", rows[:1]) == [rows[0], ["/up/style.safetensors", 1.0]]

    form = GenerateForm(prompt="a red box", relation="leaning on", relation_scale=0.6, loras=rows[:1])
    wanted = form.to_request({})
    assert (wanted.relation, wanted.relation_scale, wanted.loras) == ("leaning on", 0.6, lora_refs(rows[:1]))
    back = GenerateForm.from_request(wanted, "{}", ["leaning on"])
    assert (back.relation, back.relation_scale, back.loras) == ("leaning on", 0.6, [rows[0]])
    assert GenerateForm.from_request(GenerateRequest("x"), "{}", []).loras == lora_rows(())


def test_on_a_space_only_uploaded_loras_are_read(tmp_path):
    uploads = tmp_path / "gradio"
    (uploads / "abc").mkdir(parents=True)
    check_uploaded((LoraRef(str(uploads / "abc" / "style.safetensors")),), [uploads])
    with pytest.raises(InputError, match="add LoRA files by uploading them"):
        check_uploaded((LoraRef(str(uploads / ".." / "secret.safetensors")),), [uploads])
