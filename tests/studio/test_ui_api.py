"""The studio's HTTP API, driven with gradio_client against a real server (tiny SD 1.5 model, CPU)."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.tiny_models import subject_photos

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from engines.types import InputError  # noqa: E402
from studio.ui.forms import GenerateForm  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_regions(width: int = 64, height: int = 64, first: str = "red ball", second: str = "blue box") -> str:
    return json.dumps(
        {
            "width": width,
            "height": height,
            "regions": [
                {"id": "r1", "label": first, "box": [0.05, 0.3, 0.45, 0.75]},
                {"id": "r2", "label": second, "box": [0.55, 0.3, 0.95, 0.75]},
            ],
        }
    )


def gen_args(
    prompt: str,
    canvas: str,
    seed: int = 7,
    random_seed: bool = False,
    steps: int = 3,
    images: int = 1,
    relation: str = "",
    fit_boxes: str = "off",
) -> list:
    # the order of the /generate endpoint: prompt, negative, canvas, relation, seed, random seed, size, steps, cfg,
    # sampler, number of images, layout strength, fit objects to their boxes
    return [prompt, "", canvas, relation, seed, random_seed, "native", steps, 7.5, "default", images, 0.08, fit_boxes]


def refusal(call) -> str:
    """The one line a refused API call ends with. A GPU job's values are read (Gradio's preprocessing) before the job
    joins the queue, so a value no form takes comes back as HTTP 400 with the line as `detail`; the handler's own
    checks come back as an AppError."""
    try:
        call()
    except AppError as error:
        return str(error)
    except httpx.HTTPStatusError as error:
        assert error.response.status_code == 400
        return error.response.json()["detail"]
    raise AssertionError("the call was accepted")


@pytest.fixture(scope="module")
def studio_app(served_studio):
    return served_studio


@pytest.fixture(scope="module")
def client(studio_app):
    return Client(studio_app[1], verbose=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    return subject_photos(tmp_path_factory.mktemp("photos"), "photo")


def _troupe_request(path: str) -> dict:
    with Image.open(path) as image:
        chunks = dict(image.text)
    assert "parameters" in chunks
    return json.loads(chunks["troupe"])["request"]


def test_generate_with_two_regions_returns_pngs_with_metadata(client):
    status, gallery = client.predict(
        *gen_args("a red ball next to a blue box", two_regions(), images=2), api_name="/generate"
    )
    assert "Done" in status
    assert len(gallery) == 2
    request = _troupe_request(gallery[0]["image"])
    assert request["prompt"] == "a red ball next to a blue box"
    regions = request["layout"]["regions"]
    assert [(r["phrase"], r["layer"]) for r in regions] == [("red ball", 0), ("blue box", 1)]
    assert regions[0]["box"] == [0.05, 0.3, 0.45, 0.75]
    seeds = {_troupe_request(item["image"])["seed"] for item in gallery}
    assert seeds == {7, 8}  # one seed per image, each image reproducible alone


def test_boxes_are_fitted_as_the_model_family_chooses_and_the_choice_is_reused(client):
    def made_with(fit: str) -> tuple[dict, str]:
        status, gallery = client.predict(
            *gen_args("a red ball next to a blue box", two_regions(), fit_boxes=fit), api_name="/generate"
        )
        assert "Done" in status
        widgets = _widgets(client.predict(handle_file(gallery[0]["image"]), api_name="/open_png"))
        return _troupe_request(gallery[0]["image"])["guidance"], widgets["fit_boxes"]

    guidance, reopened = made_with("auto")
    assert guidance["fit_iterations"] == 0 and reopened == "off"  # auto on SD 1.5: Cones 2's forward guidance
    guidance, reopened = made_with("quick")
    assert (guidance["fit_iterations"], guidance["fit_depth"]) == (3, "crowd") and reopened == "quick"


def test_an_unknown_fitting_is_refused_by_name():
    assert GenerateForm().fit_choice == "auto"
    with pytest.raises(InputError, match="fit_boxes must be one of auto, off, quick, full"):
        GenerateForm(fit_boxes="fast").fit_choice  # noqa: B018


def test_register_a_subject_then_generate_with_it(client, photos, studio_app):
    job = client.submit([handle_file(p) for p in photos], "rex", "ball", "quick", api_name="/register")
    status, cards = job.result(timeout=120)
    assert "ready" in status
    assert any("loss" in str(out[0]) and "step" in str(out[0]) for out in job.outputs())  # live step, loss, ETA
    assert any("<rex>" in (card.get("caption") or "") for card in cards)
    assert [s.name for s in studio_app[0].subjects()] == ["rex"]
    # the relation picker fills the prompt and proposes two boxes, the subject bound by name
    _, prompt, canvas = client.predict(
        "next to", "<rex>", "blue box", "on grass", two_regions(), api_name="/apply_relation"
    )
    assert prompt == "<rex> next to blue box on grass"
    labels = [r["label"] for r in json.loads(canvas)["regions"]]
    assert labels == ["<rex>", "blue box"]
    status, gallery = client.predict(*gen_args(prompt, canvas, relation="next to"), api_name="/generate")
    request = _troupe_request(gallery[0]["image"])
    assert request["relation"] == "next to"
    assert request["layout"]["regions"][0]["subject"] == "rex"
    assert request["layout"]["regions"][0]["phrase"] == "ball"


def test_reuse_settings_from_a_png_and_project_round_trip(client, tmp_path):
    _, gallery = client.predict(
        *gen_args("a red ball next to a blue box", two_regions(), seed=11), api_name="/generate"
    )
    values = client.predict(handle_file(gallery[0]["image"]), api_name="/open_png")
    prompt, _, canvas, _, seed, random_seed = values[:6]
    assert prompt == "a red ball next to a blue box" and seed == 11 and random_seed is False
    assert [r["label"] for r in json.loads(canvas)["regions"]] == ["red ball", "blue box"]
    project = client.predict(
        *gen_args("a red ball next to a blue box", two_regions(), seed=5), api_name="/save_project"
    )
    path = project["value"] if isinstance(project, dict) and "value" in project else project
    data = json.loads(Path(path).read_text())
    assert data["format"] == "troupe-project" and data["request"]["seed"] == 5
    reopened = client.predict(handle_file(path), api_name="/open_project")
    assert reopened[0] == "a red ball next to a blue box" and reopened[4] == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(AppError, match="unknown keys colour"):
        client.predict(handle_file(str(bad)), api_name="/open_project")


def test_generate_by_keyword_with_named_parameters(client):
    """The API names /generate's parameters after the form's fields; left-out ones take the widgets' values."""
    names = [
        p["parameter_name"]
        for p in client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    ]
    assert names == [
        "prompt",
        "negative_prompt",
        "canvas",
        "relation",
        "seed",
        "random_seed",
        "size",
        "steps",
        "cfg",
        "sampler",
        "images",
        "layout_strength",
        "fit_boxes",
        "references",
        "reference_strength",
        "image_guidance",
        "image_guidance_growth",
        "reference_adapter",
        "start",
        "start_strength",
        "relation_scale",
        "loras",
    ]
    canvas = json.loads(two_regions())
    canvas["regions"][0]["layer"], canvas["regions"][1]["layer"] = 1, 0  # the red ball in front
    status, gallery = client.predict(
        prompt="a red ball next to a blue box",
        canvas=json.dumps(canvas),
        seed=3,
        random_seed=False,
        steps=2,
        api_name="/generate",
    )
    assert "Done" in status and len(gallery) == 1
    request = _troupe_request(gallery[0]["image"])
    assert (request["seed"], request["steps"], request["negative_prompt"]) == (3, 2, "")
    assert [(r["phrase"], r["layer"]) for r in request["layout"]["regions"]] == [("red ball", 1), ("blue box", 0)]


@pytest.mark.parametrize(
    "prompt, canvas, message",
    [
        ("", two_regions(), "prompt is empty"),
        (
            "a red ball",
            json.dumps(
                {"width": 64, "height": 64, "regions": [{"id": "r1", "label": "red ball", "box": [0.3, 0.3, 0.3, 0.6]}]}
            ),
            "zero size",
        ),
        (
            "a red ball",
            json.dumps(
                {"width": 64, "height": 64, "regions": [{"id": "r1", "label": "", "box": [0.1, 0.1, 0.6, 0.6]}]}
            ),
            "has no name",
        ),
        ("<ghost> on grass", two_regions(first="<ghost>"), "no subject named <ghost>"),
        ("a red ball", "{not json", "not valid JSON"),
        ("a red ball on grass", two_regions(), "'blue box' is not in the prompt"),
    ],
)
def test_bad_generation_input_is_one_readable_message(client, prompt, canvas, message):
    with pytest.raises(AppError, match=message):
        client.predict(*gen_args(prompt, canvas), api_name="/generate")


def test_bad_registration_input_is_refused(client, photos, tmp_path, studio_app):
    note = tmp_path / "notes.txt"
    note.write_text("not a photo")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"definitely not a png")
    before = [s.name for s in studio_app[0].subjects()]
    assert "Invalid file type" in refusal(
        lambda: client.predict([handle_file(str(note))], "milo", "cat", "quick", api_name="/register")
    )
    with pytest.raises(AppError, match="not a readable image"):
        client.predict([handle_file(str(fake))], "milo", "cat", "quick", api_name="/register")
    with pytest.raises(AppError, match="not allowed"):
        client.predict([handle_file(photos[0])], "", "cat", "quick", api_name="/register")
    with pytest.raises(AppError, match="class word is empty"):
        client.predict([handle_file(photos[0])], "milo", "", "quick", api_name="/register")
    assert [s.name for s in studio_app[0].subjects()] == before  # nothing changed


def test_add_region_and_relation_arity(client):
    canvas = client.predict(json.dumps({"width": 64, "height": 64, "regions": []}), "a tent", api_name="/add_region")[0]
    regions = json.loads(canvas)["regions"]
    assert [r["label"] for r in regions] == ["a tent"]
    with pytest.raises(AppError, match="pick a subject or type a phrase"):
        client.predict(canvas, "", api_name="/add_region")
    update, prompt, canvas = client.predict("riding a horse", "a knight", None, "", canvas, api_name="/apply_relation")
    assert prompt == "a knight riding a horse"  # the relation's own scene is only a suggestion in the Scene box
    assert len(json.loads(canvas)["regions"]) == 1


def test_per_user_libraries_are_private(tiny_sd15_dir, tmp_path, photos):
    """On a Space every browser session has its own subject library: one visitor never sees another's subjects."""
    import engines.register as register
    from engines.service import Studio
    from engines.types import ModelSpec
    from studio.ui import build_ui, serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            register.PRESETS,
            "quick",
            replace(register.PRESETS["quick"], steps=4, reg_pool=16, delta_sentences=16, reg_batch=2),
        )
        studio = Studio(ModelSpec(source=str(tiny_sd15_dir)), tmp_path / "shared")
        demo = build_ui(studio, per_user_library=tmp_path / "visitors", allow_model_switch=False)
        _, url, _ = serve(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            alice, bob = Client(url, verbose=False), Client(url, verbose=False)
            alice.predict([handle_file(photos[0])], "rex", "ball", "quick", api_name="/register")
            _, prompt, _ = alice.predict("next to", "<rex>", "blue box", "", two_regions(), api_name="/apply_relation")
            assert prompt == "<rex> next to blue box"
            with pytest.raises(AppError, match="no subject named <rex>"):
                bob.predict("next to", "<rex>", "blue box", "", two_regions(), api_name="/apply_relation")
            assert studio.subjects() == []  # nothing landed in the shared library
            with pytest.raises(AppError, match="fixed"):
                bob.predict("demo", "auto", "auto", "none", "none", api_name="/load_model")
            with pytest.raises(AppError, match="on this Space add LoRA files by uploading them"):  # no server paths
                bob.predict(prompt="a red ball", loras=_lora_table([["/etc/x.safetensors", 1]]), api_name="/generate")
        finally:
            demo.close()


def test_rename_export_delete_import_a_subject(client, studio_app, photos):
    names = lambda: [s.name for s in studio_app[0].subjects()]  # noqa: E731
    if "rex" not in names():
        client.predict([handle_file(p) for p in photos], "rex", "ball", "quick", api_name="/register")
    client.predict("rex", "rex2", api_name="/rename_subject")
    assert "rex2" in names() and "rex" not in names()
    exported = client.predict("rex2", api_name="/export_subject")
    path = exported["value"] if isinstance(exported, dict) and "value" in exported else exported
    assert str(path).endswith(".safetensors") and Path(path).stat().st_size > 0
    client.predict("rex2", api_name="/delete_subject")
    assert "rex2" not in names()
    message = client.predict(handle_file(path), api_name="/import_subject")
    assert "rex2" in message and "rex2" in names()
    with pytest.raises(AppError, match="select a subject first"):
        client.predict(None, api_name="/export_subject")


# ------------------------------------------------------------------------------------------- pure helpers
def test_canvas_json_to_layout_is_back_to_front_and_binds_subjects():
    from studio.ui.canvas import add_region, canvas_to_layout, layout_to_canvas

    layout = canvas_to_layout(two_regions(first="<rex>"), {"rex": "dog"})
    rex, box = layout.regions
    assert (rex.subject, rex.phrase, rex.layer) == ("rex", "dog", 0) and (box.phrase, box.layer) == ("blue box", 1)
    again = json.loads(layout_to_canvas(layout, 64, 64, ["<rex>"]))
    assert [r["label"] for r in again["regions"]] == ["<rex>", "blue box"] and again["suggestions"] == ["<rex>"]
    grown = json.loads(add_region(two_regions(), "a tent"))
    assert [r["id"] for r in grown["regions"]] == ["r1", "r2", "r3"]
    from engines.types import InputError

    with pytest.raises(InputError, match="canvas: unknown keys zoom"):
        canvas_to_layout(json.dumps({"regions": [], "zoom": 2}), {})


def test_a_canvas_layer_key_sets_front_and_back():
    """`layer` (0 = back) overrides the list order; regions without one keep their index as their layer."""
    from engines.types import InputError
    from studio.ui.canvas import add_region, canvas_to_layout, layout_to_canvas

    data = json.loads(two_regions())
    data["regions"][0]["layer"], data["regions"][1]["layer"] = 1, 0  # listed first, but in front
    layout = canvas_to_layout(json.dumps(data), {})
    assert [r.phrase for r in layout.back_to_front()] == ["blue box", "red ball"]
    assert {r.phrase: r.layer for r in layout.regions} == {"red ball": 1, "blue box": 0}
    mixed = json.loads(two_regions())
    mixed["regions"][1]["layer"] = 0  # index 0 and layer 0: equal layers, the later region in front
    assert [r.phrase for r in canvas_to_layout(json.dumps(mixed), {}).back_to_front()] == ["red ball", "blue box"]
    again = json.loads(layout_to_canvas(layout, 64, 64))  # the editor's form: listed back to front, no layer keys
    assert [r["label"] for r in again["regions"]] == ["blue box", "red ball"]
    grown = json.loads(add_region(json.dumps(data), "a tent"))  # a new region goes in front of explicit layers
    assert grown["regions"][-1]["layer"] == 2
    data["regions"][0]["layer"] = -1
    with pytest.raises(InputError, match="layer must be a whole number"):
        canvas_to_layout(json.dumps(data), {})


def test_vram_presets_are_validated(tmp_path):
    from engines.presets import load_vram_presets
    from engines.types import InputError

    presets = load_vram_presets()
    assert {"CPU", "8 GB", "24 GB", "A100"} <= set(presets)
    assert presets["8 GB"].spec("demo").quantization == "nf4"
    bad = tmp_path / "vram.json"
    bad.write_text(
        json.dumps(
            {
                "version": 1,
                "presets": [{"name": "x", "device": "cuda", "dtype": "fp8", "quantization": "none", "offload": "none"}],
            }
        )
    )
    with pytest.raises(InputError, match="dtype must be one of"):
        load_vram_presets(bad)


def test_a_stopped_job_reports_cancelled_between_steps():
    import threading

    from engines.types import Cancelled, StepProgress
    from studio.ui.jobs import stream

    def work(on_progress, cancel):
        for step in range(1, 1000):
            if cancel.is_set():
                raise Cancelled()
            on_progress(StepProgress(step, 1000, 0.01 * step))
            threading.Event().wait(0.001)
        return "finished"

    cancel = threading.Event()
    seen = []
    with pytest.raises(Cancelled):
        for kind, _item in stream(work, cancel):
            seen.append(kind)
            if len(seen) == 3:
                cancel.set()
    assert seen[:3] == ["progress"] * 3


def test_stop_ends_a_running_generation(client):
    """Stop (same browser session) cancels between two steps; the results already shown stay (gr.skip)."""
    import time

    job = client.submit(*gen_args("a red ball next to a blue box", two_regions(), steps=150), api_name="/generate")
    deadline = time.time() + 60
    while time.time() < deadline and not any("step" in str(o[0]) for o in job.outputs()):
        time.sleep(0.1)
    client.predict(api_name="/stop")
    status, _ = job.result(timeout=60)
    assert "Stopped" in status


def test_studio_ui_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, studio.ui, app; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_app_on_a_space_wraps_gpu_work_and_isolates_visitors(tiny_sd15_dir, tmp_path, monkeypatch):
    """app.py as a Hugging Face Space entry, with a stand-in `spaces` package (ZeroGPU's decorator API)."""
    import importlib
    import sys
    import types

    wrapped = {}

    def gpu(duration):
        def decorate(fn):
            wrapped[fn.__name__] = duration
            return fn

        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.setenv("SPACE_ID", "someone/troupe")
    import app

    app = importlib.reload(app)
    served = {}
    monkeypatch.setattr(app, "serve", lambda demo, *args, **kwargs: served.update(demo=demo, args=args))
    from engines.service import Studio
    from engines.types import ModelSpec

    monkeypatch.setattr(app, "make_studio", lambda *a: Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path / "lib"))
    assert app.main(["--model", "ignored"]) == 0
    assert set(wrapped) == {"generate", "register", "load_model", "teach"}
    steps_at = ["prompt", "negative", "canvas", "relation", "seed", "randomize", "size", "steps"].index("steps")
    values = [None] * 13
    values[steps_at], values[10] = 30, 2  # 30 steps, 2 images
    assert 10 < wrapped["generate"](None, *values) <= 120
    values[steps_at], values[12] = 10, "full"  # box fitting asks for more time
    assert wrapped["generate"](None, *values) > wrapped["generate"](None, *values[:12], "off")
    assert wrapped["register"](None, [], "rex", "dog", "quick") < wrapped["register"](
        None, [], "rex", "dog", "thorough"
    )
    assert served["args"][0] is None  # host from $GRADIO_SERVER_NAME on a Space
    monkeypatch.delitem(sys.modules, "spaces")
    importlib.reload(app)


def test_switching_models_keeps_the_old_one_on_failure(client, studio_app, tiny_sd15_dir, tmp_path):
    studio = studio_app[0]
    before = studio.model_spec
    with pytest.raises(AppError, match="does not exist"):
        client.predict(str(tmp_path / "no-such-model"), "cpu", "fp32", "none", "none", api_name="/load_model")
    assert studio.model_spec == before
    status, info, badge, size = client.predict(
        str(tiny_sd15_dir), "cpu", "fp32", "none", "none", api_name="/load_model"
    )
    assert "Loaded" in status and "sd15" in info and studio.model_spec.device == "cpu"


# ------------------------------------------------------------------------------------------- references
def _widgets(values) -> dict:
    """/open_png's outputs by GenerateForm's field names (a widened slider comes back as its value)."""
    from studio.ui.forms import GenerateForm

    values = [v["value"] if isinstance(v, dict) and "value" in v else v for v in values]
    return dict(zip(GenerateForm.names(), values))


def test_an_instant_subject_with_the_reference_widgets_and_reuse_restores_them(client, studio_app, photos):
    status, cards = client.predict([handle_file(photos[0])], "pip", "ball", "instant", api_name="/register")
    assert "ready" in status and "photos only" in status
    assert any("<pip>" in (card.get("caption") or "") and "photos only" in card["caption"] for card in cards)
    canvas = json.dumps({"width": 64, "height": 64, "regions": [{"label": "<pip>", "box": [0.1, 0.2, 0.6, 0.9]}]})
    chosen = dict(references="on", reference_strength=2.5, image_guidance=1.5, image_guidance_growth=0.5,
                  reference_adapter=False, start="collage", start_strength=0.6)  # fmt: skip
    status, gallery = client.predict(
        prompt="a photo of <pip> on grass", canvas=canvas, seed=4, random_seed=False, steps=3, **chosen,
        api_name="/generate",
    )  # fmt: skip
    assert "Done" in status and len(gallery) == 1
    references = _troupe_request(gallery[0]["image"])["references"]
    assert references == {"enabled": True, "strength": 2.5, "adapter": False, "image_guidance": 1.5,
                          "image_guidance_growth": 0.5, "start": "collage", "start_strength": 0.6}  # fmt: skip
    restored = _widgets(client.predict(handle_file(gallery[0]["image"]), api_name="/open_png"))
    assert {name: restored[name] for name in chosen} == chosen


def test_reuse_keeps_a_reference_strength_beyond_the_slider(client, studio_app, tmp_path):
    from engines.types import GenerateRequest, ReferenceConfig

    studio = studio_app[0]
    wanted = GenerateRequest("a red ball", steps=1, seed=1, references=ReferenceConfig(enabled=False, strength=6.0))
    path = studio.save_png(studio.generate(wanted).images[0], tmp_path / "strong.png")
    restored = _widgets(client.predict(handle_file(str(path)), api_name="/open_png"))
    assert (restored["references"], restored["reference_strength"]) == ("off", 6.0)


def test_the_results_warnings_reach_the_status_line(client, studio_app, photos):
    client.predict([handle_file(photos[0])], "bo", "ball", "quick", api_name="/register")
    studio = studio_app[0]
    for photo in next(s for s in studio.subjects() if s.name == "bo").photos:
        Path(photo).unlink()
    status, gallery = client.predict(
        prompt="a photo of <bo>", canvas=json.dumps({"width": 64, "height": 64, "regions": []}), references="on",
        steps=1, api_name="/generate",
    )  # fmt: skip
    assert len(gallery) == 1 and "no photos left" in status and "no subject in the prompt has photos" in status


def test_bad_reference_values_from_the_api_are_one_readable_message(client):
    maybe = refusal(lambda: client.predict(prompt="a", canvas=two_regions(), references="maybe", api_name="/generate"))
    spiral = refusal(lambda: client.predict(prompt="a", canvas=two_regions(), start="spiral", api_name="/generate"))
    assert "'maybe'" in maybe and "['auto', 'on', 'off']" in maybe
    assert "'spiral'" in spiral and "\n" not in spiral


def test_references_raise_the_zerogpu_duration_only_when_they_run():
    from studio.ui.forms import GenerateForm
    from studio.ui.image_settings import generate_seconds

    def seconds(**fields) -> float:
        return generate_seconds(None, *GenerateForm(steps=30, **fields).as_outputs())

    plain = seconds(prompt="a red ball")
    assert seconds(prompt="a red ball", references="auto") == plain  # no <subject>: auto stays off
    assert seconds(prompt="<rex> on grass") > plain
    assert seconds(prompt="<rex> on grass", image_guidance=2.0) > seconds(prompt="<rex> on grass")
    assert seconds(prompt="<rex> on grass", references="off") == plain


# ------------------------------------------------------------------------------------------- relations, LoRAs
def _lora_table(rows: list) -> dict:
    """The LoRA list as an API client sends a table."""
    return {"headers": ["LoRA file (.safetensors)", "scale"], "data": rows}


def _relation_args(files: list[str], annotations: str, name: str = "leaning on", steps: int = 3) -> dict:
    return dict(name=name, relation="leaning on", template="{a} leaning on {b}",
                examples=[handle_file(f) for f in files], annotations=annotations, steps=steps)  # fmt: skip


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from tests.studio.test_relations_ui import annotated, pictures

    files = pictures(tmp_path_factory.mktemp("relation"))
    return files, json.dumps(annotated(files))


def _library_files(studio) -> list[str]:
    return sorted(str(p.relative_to(studio.library_dir)) for p in Path(studio.library_dir).rglob("*"))


def test_bad_relation_input_is_one_line_and_writes_nothing(client, studio_app, examples, tmp_path):
    studio = studio_app[0]
    files, annotations = examples
    before = _library_files(studio)
    with pytest.raises(AppError, match=r"3–20 example images \(got 2\)"):
        client.predict(**_relation_args(files[:2], json.dumps(json.loads(annotations)[:2])), api_name="/teach_relation")
    with pytest.raises(AppError, match="example 00.png: write its prompt"):
        blank = json.loads(annotations)
        blank[0]["prompt"] = ""
        client.predict(**_relation_args(files, json.dumps(blank)), api_name="/teach_relation")
    broken = tmp_path / "01.png"
    broken.write_bytes(b"not a png at all")  # passes the tab's checks; the engine's reading refuses it
    with pytest.raises(AppError, match="01.png: not an image"):
        client.predict(**_relation_args([files[0], str(broken), files[2]], annotations), api_name="/teach_relation")
    with pytest.raises(AppError, match="safetensors files only"):
        client.predict(prompt="a red ball", loras=_lora_table([["style.ckpt", 1]]), api_name="/generate")
    with pytest.raises(AppError, match="Invalid file type|import a relation file exported by Troupe"):
        client.predict(handle_file(files[0]), api_name="/import_relation")
    assert _library_files(studio) == before


def test_teach_cancel_resume_then_generate_with_the_relation_and_a_lora(client, studio_app, examples, monkeypatch):
    """Train, Cancel, Train again: it goes on from where it stopped. Then the relation is in the picker, generates
    at its strength with a LoRA from the list, and comes back from the PNG; export, delete, import and rename."""
    import threading

    studio = studio_app[0]
    files, annotations = examples
    teach, reached = studio.teach_relation, threading.Event()

    def held_at_step_2(request, on_progress, cancel):
        """The first training waits at step 2 for /cancel_relation, so the test does not race a fast machine."""

        def progress(step):
            on_progress(step)
            if step.step == 2 and not reached.is_set():
                reached.set()
                cancel.wait(60)

        return teach(request, progress, cancel)

    monkeypatch.setattr(studio, "teach_relation", held_at_step_2)
    job = client.submit(**_relation_args(files, annotations, steps=8), api_name="/teach_relation")
    assert reached.wait(120)
    client.predict(api_name="/cancel_relation")
    assert "Cancelled at step 2" in job.result(timeout=60)
    assert studio.learned_relations() == []
    job = client.submit(**_relation_args(files, annotations, steps=8), api_name="/teach_relation")
    assert "is learned" in job.result(timeout=120)
    steps = [int(m) for o in job.outputs() for m in re.findall(r"step (\d+)/8", str(o))]
    assert steps and min(steps) > 2  # resumed from the checkpoint, not from the first step
    assert "leaning on" in studio.relations() and studio.relations()["leaning on"].lora is not None

    _, prompt, canvas = client.predict(
        "leaning on", "red box", "blue tent", "", two_regions(), api_name="/apply_relation"
    )
    exported = client.predict("leaning on", "kohya", api_name="/export_relation")
    lora = exported["value"] if isinstance(exported, dict) and "value" in exported else exported
    status, gallery = client.predict(prompt=prompt, canvas=canvas, relation="leaning on", relation_scale=0.5, steps=2,
                                     loras=_lora_table([[lora, 0.7]]), api_name="/generate")  # fmt: skip
    request = _troupe_request(gallery[0]["image"])
    assert (request["relation"], request["relation_scale"]) == ("leaning on", 0.5)
    assert request["loras"] == [{"path": lora, "scale": 0.7}]
    restored = _widgets(client.predict(handle_file(gallery[0]["image"]), api_name="/open_png"))
    assert (restored["relation"], restored["relation_scale"]) == ("leaning on", 0.5)
    table = restored["loras"]
    assert (table["data"] if isinstance(table, dict) else table) == [[lora, 0.7]]

    diffusers = client.predict("leaning on", "diffusers", api_name="/export_relation")
    diffusers = diffusers["value"] if isinstance(diffusers, dict) and "value" in diffusers else diffusers
    client.predict("leaning on", api_name="/delete_relation")
    assert studio.learned_relations() == []
    assert "leaning on" in client.predict(handle_file(diffusers), api_name="/import_relation")
    client.predict("leaning on", "leans on", api_name="/rename_relation")
    assert [r.name for r in studio.learned_relations()] == ["leans on"]
    with pytest.raises(AppError, match="is a LoRA, not a Troupe relation"):
        plain = Path(lora).with_name("plain.safetensors")
        from safetensors.torch import load_file, save_file

        save_file(load_file(lora), str(plain))  # the weights without the relation's card
        client.predict(handle_file(str(plain)), api_name="/import_relation")
