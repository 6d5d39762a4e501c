"""The real studio in headless Chromium (Debian's /usr/bin/chromium, Playwright's sync API), tiny SD 1.5 model.

One walk through the studio, as a person would: a bad upload shows a readable message; register two subjects from
photo files; draw two boxes with the mouse and name them; reorder the layers; pick a relation (it fills the prompt
and proposes boxes), move a proposed box; generate and see the image, whose PNG carries the moved box.
Screenshots go to pytest's temporary folder (nothing is left in the checkout); TROUPE_SCREENSHOTS=DIR keeps them there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.tiny_models import subject_photos

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path()  # set for each module run by the `screenshots` fixture below
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module", autouse=True)
def screenshots(tmp_path_factory):
    """Where the screenshots go: a person looks at them after a run; a run must not leave files in the checkout."""
    global ARTIFACTS
    ARTIFACTS = Path(os.environ.get("TROUPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def app_url(served_studio):
    return served_studio[1]


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(app_url)
        page.wait_for_selector("#canvas .tc-stage")
        yield page
        browser.close()


def _drag(page, stage, start, end, shift: bool = False):
    bb = stage.bounding_box()
    page.mouse.move(bb["x"] + start[0] * bb["width"], bb["y"] + start[1] * bb["height"])
    if shift:
        page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(bb["x"] + end[0] * bb["width"], bb["y"] + end[1] * bb["height"], steps=8)
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def _row_labels(page) -> list[str]:
    """Layer list, front first."""
    return page.locator("#layer-list .tc-row input").evaluate_all("els => els.map(e => e.value)")


def _pick(page, elem_id: str, text: str, custom: bool = False):
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(text)
    if custom:
        box.press("Enter")
        box.press("Tab")
    else:
        page.locator("[role=option]", has_text=text).first.click()


def test_walk_through_the_studio(page, tmp_path):
    expect = sync_api.expect

    # --- Subjects: a bad upload is one readable message, then a real registration
    page.get_by_role("tab", name="Subjects").click()
    page.locator("#register-btn").click()
    expect(page.get_by_text("drop 1–10 photos of the subject first").first).to_be_visible()
    page.locator("#subject-photos input[type=file]").set_input_files(subject_photos(tmp_path, "rex"))
    expect(page.locator("#subject-photos")).to_contain_text(re.compile(r"rex2\s*\.png"))
    page.locator("#subject-name input, #subject-name textarea").first.fill("rex")
    _pick(page, "subject-class", "ball", custom=True)
    page.get_by_role("radio", name="quick").check()
    page.locator("#register-btn").click()
    expect(page.locator("#register-status")).to_contain_text("is ready", timeout=90_000)
    expect(page.locator("#subject-gallery")).to_contain_text("<rex>")
    # a second subject, so two registered subjects can be placed together
    page.locator("#subject-photos input[type=file]").set_input_files(subject_photos(tmp_path, "rex"))
    page.locator("#subject-name input, #subject-name textarea").first.fill("milo")
    _pick(page, "subject-class", "box", custom=True)
    page.locator("#register-btn").click()
    expect(page.locator("#register-status")).to_contain_text("milo", timeout=90_000)
    expect(page.locator("#register-status")).to_contain_text("is ready", timeout=90_000)
    expect(page.locator("#subject-gallery")).to_contain_text("<milo>")

    # --- Compose: draw two boxes with the mouse and name them
    page.get_by_role("tab", name="Compose").click()
    stage = page.locator("#canvas .tc-stage")
    _drag(page, stage, (0.08, 0.25), (0.48, 0.85))
    page.keyboard.type("<rex>")
    page.keyboard.press("Enter")
    _drag(page, stage, (0.55, 0.2), (0.92, 0.7))
    page.keyboard.type("<milo>")
    page.keyboard.press("Enter")
    expect(page.locator("#canvas .tc-box")).to_have_count(2)
    assert _row_labels(page) == ["<milo>", "<rex>"]  # front first

    # a zero-size "box" (a click) draws nothing; a tiny drag says why
    _drag(page, stage, (0.5, 0.9), (0.505, 0.905))
    expect(page.locator("#canvas .tc-msg")).to_contain_text("too small")
    expect(page.locator("#canvas .tc-box")).to_have_count(2)

    # --- reorder layers: bring <rex> to the front
    page.locator("#layer-list .tc-row").nth(1).locator(".tc-up").click()  # the back row: <rex>
    assert _row_labels(page) == ["<rex>", "<milo>"]
    z = page.locator("#canvas .tc-box").evaluate_all("els => els.map(e => [e.innerText, +e.style.zIndex])")
    assert max(z, key=lambda t: t[1])[0].endswith("<rex>")
    page.screenshot(path=str(ARTIFACTS / "studio-canvas.png"), full_page=True)

    # --- a relation fills the prompt and proposes boxes; move the proposed box of <rex>
    _pick(page, "relation", "A next to B")
    _pick(page, "relation-a", "<rex>", custom=True)
    _pick(page, "relation-b", "<milo>", custom=True)
    expect(page.locator("#prompt textarea")).to_have_value(re.compile(r"^<rex> next to <milo>"))
    expect(page.locator("#canvas .tc-box")).to_have_count(2)
    rex_box = page.locator("#canvas .tc-box", has_text="<rex>")
    before = rex_box.bounding_box()
    bb = stage.bounding_box()
    _drag(
        page,
        stage,
        ((before["x"] + before["width"] / 2 - bb["x"]) / bb["width"], 0.55),
        ((before["x"] + before["width"] / 2 - bb["x"]) / bb["width"], 0.45),
    )
    after = rex_box.bounding_box()
    assert after["y"] < before["y"] - 0.05 * bb["height"]

    # --- generate, see the image; its PNG carries the moved box
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate-btn").click()
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=60_000)
    image = page.locator("#result-gallery img").first
    expect(image).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "studio-generated.png"), full_page=True)
    png = page.request.get(image.get_attribute("src")).body()
    (tmp_path / "result.png").write_bytes(png)
    with Image.open(tmp_path / "result.png") as result:
        request = json.loads(result.text["troupe"])["request"]
    regions = {r["subject"] or r["phrase"]: r for r in request["layout"]["regions"]}
    assert request["relation"] == "next to" and set(regions) == {"rex", "milo"}
    assert regions["rex"]["box"][1] < 0.3  # next to's default y0 is 0.3: the person's move reached the engine

    # --- bad input in Compose: an empty prompt is a readable message and changes nothing
    page.locator("#prompt textarea").fill("")
    page.locator("#generate-btn").click()
    expect(page.get_by_text("the prompt is empty").first).to_be_visible()
    expect(page.locator("#gen-status")).to_contain_text("Done")
    page.screenshot(path=str(ARTIFACTS / "studio-bad-input.png"), full_page=True)

    # --- reuse the settings of a result: the prompt, the seed and the boxes come back
    page.locator("#result-gallery img").first.click()
    page.locator("#reuse-btn").click()
    expect(page.locator("#prompt textarea")).to_have_value(re.compile(r"^<rex> next to <milo>"))
    expect(page.locator("#random-seed input")).not_to_be_checked()
    expect(page.locator("#canvas .tc-box")).to_have_count(2)


def test_subjects_tab_screenshot(page):
    """After the walk: the Subjects tab with its card (a picture for the report and for reviewers)."""
    page.get_by_role("tab", name="Subjects").click()
    sync_api.expect(page.locator("#subject-gallery")).to_contain_text("<rex>")
    sync_api.expect(page.locator("#subject-gallery")).to_contain_text("<milo>")
    page.locator("#subject-gallery img").first.click()  # cards are sorted by name
    sync_api.expect(page.locator("#subject-detail")).to_contain_text("<milo>")
    sync_api.expect(page.locator("#subject-detail")).to_contain_text("loss on its photos")  # did it learn?
    page.screenshot(path=str(ARTIFACTS / "studio-subjects.png"), full_page=True)
    # "Place on canvas" adds a region for the subject and goes back to the canvas
    before = page.locator("#canvas .tc-box").count()
    page.locator("#place-btn").click()
    sync_api.expect(page.locator("#canvas .tc-box")).to_have_count(before + 1)
    sync_api.expect(page.locator("#canvas .tc-stage")).to_be_visible()


def test_a_non_image_upload_is_a_readable_message(page, tmp_path):
    page.get_by_role("tab", name="Subjects").click()
    page.locator("#subject-photos button[aria-label='Clear']").first.click() if page.locator(
        "#subject-photos button[aria-label='Clear']"
    ).count() else None
    note = tmp_path / "notes.txt"
    note.write_text("not a photo")
    page.locator("#subject-photos input[type=file]").set_input_files(str(note))
    page.locator("#subject-name input, #subject-name textarea").first.fill("nemo")
    page.locator("#register-btn").click()
    sync_api.expect(page.get_by_text(re.compile(r"is not an image|Invalid file type")).first).to_be_visible()
    sync_api.expect(page.locator("#subject-gallery")).not_to_contain_text("<nemo>")
    page.screenshot(path=str(ARTIFACTS / "studio-bad-upload.png"), full_page=True)


def test_settings_machine_preset_fills_the_fields(page):
    page.get_by_role("tab", name="Model & settings").click()
    sync_api.expect(page.locator("#model-source textarea, #model-source input").first).to_be_visible()
    _pick(page, "vram-preset", "8 GB")
    sync_api.expect(page.locator("#quantization input")).to_have_value("nf4")
    sync_api.expect(page.locator("#offload input")).to_have_value("model")
    page.screenshot(path=str(ARTIFACTS / "studio-settings.png"), full_page=True)


def test_an_instant_subject_from_one_demo_world_photo_is_generated_in_its_box(page, tmp_path):
    """Instant registration (no training) from one photo of the demo world, then that subject placed in a box on
    the canvas with references switched on: an image comes back, and its PNG says the photos were read."""
    from demo_world.scenes import ObjectSpec
    from demo_world.scenes import subject_photos as demo_photos

    expect = sync_api.expect
    photo = tmp_path / "pip.png"
    Image.fromarray(demo_photos(ObjectSpec("ball", "red", "striped", "yellow"), 1, seed=2)[0].image).save(photo)
    page.reload()  # a clean Compose tab; the library (rex, milo) stays
    page.wait_for_selector("#canvas .tc-stage")

    page.get_by_role("tab", name="Subjects").click()
    page.locator("#subject-photos input[type=file]").set_input_files(str(photo))
    expect(page.locator("#subject-photos")).to_contain_text(re.compile(r"pip\s*\.png"))
    page.locator("#subject-name input, #subject-name textarea").first.fill("pip")
    _pick(page, "subject-class", "ball", custom=True)
    page.get_by_role("radio", name="Instant (no training)").check()
    page.locator("#register-btn").click()
    expect(page.locator("#register-status")).to_contain_text("is ready", timeout=60_000)
    expect(page.locator("#register-status")).to_contain_text("photos only")
    expect(page.locator("#subject-gallery")).to_contain_text("<pip> · ball · sd15 · photos only")
    page.screenshot(path=str(ARTIFACTS / "studio-instant-register.png"), full_page=True)

    page.get_by_role("tab", name="Compose").click()
    page.locator("#prompt textarea").fill("a photo of <pip> on grass")
    _drag(page, page.locator("#canvas .tc-stage"), (0.15, 0.2), (0.7, 0.85))
    page.keyboard.type("<pip>")
    page.keyboard.press("Enter")
    expect(page.locator("#canvas .tc-box")).to_have_count(1)
    page.locator("#references").get_by_text("References (the subjects' photos)").first.click()
    page.locator("#references-switch").get_by_text("On", exact=True).click()
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate-btn").click()
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=60_000)
    image = page.locator("#result-gallery img").first
    expect(image).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "studio-instant-subject.png"), full_page=True)
    (tmp_path / "pip-result.png").write_bytes(page.request.get(image.get_attribute("src")).body())
    with Image.open(tmp_path / "pip-result.png") as result:
        request = json.loads(result.text["troupe"])["request"]
    assert [r["subject"] for r in request["layout"]["regions"]] == ["pip"]
    assert request["references"]["enabled"] is True  # the photos were read, inside the box


# ------------------------------------------------------------------------------------------- relations
BOX_A, BOX_B = (0.15, 0.16, 0.55, 0.92), (0.58, 0.32, 0.92, 0.92)  # where the pictures below put the two objects


def relation_pictures(folder: Path, count: int = 3) -> list[str]:
    """A red block leaning on a blue one (64×64), a little differently each time."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.full((64, 64, 3), (110, 170, 90), np.uint8)
        pixels[21:59, 37:59] = (40, 70, 210)
        for row in range(11, 58):
            shift = (row - 11) // 6
            pixels[row, 10 + i + shift : 27 + i + shift] = (215, 40, 40)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        paths.append(str(folder / f"{i:02d}.png"))
    return paths


def _click_picture(page, x: float, y: float) -> None:
    """Click at (x, y), fractions of the example picture as shown, and wait for it to be redrawn."""
    image = page.locator("#relation-example-image img").first
    before = image.get_attribute("src")
    shown = image.evaluate(
        "e => { const r = e.getBoundingClientRect();"
        " const s = Math.min(r.width / e.naturalWidth, r.height / e.naturalHeight, 1);"
        " return {x: r.left + (r.width - e.naturalWidth * s) / 2, y: r.top + (r.height - e.naturalHeight * s) / 2,"
        " w: e.naturalWidth * s, h: e.naturalHeight * s}; }"
    )  # object-fit: scale-down (Gradio's), centred: where the person sees the picture
    page.mouse.click(shown["x"] + x * shown["w"], shown["y"] + y * shown["h"])
    sync_api.expect(image).not_to_have_attribute("src", before or "", timeout=20_000)


def test_teach_a_relation_by_clicking_boxes_then_generate_with_it(page, served_studio, tmp_path):
    """Relations tab: name the relation, upload three pictures, write one prompt for all, click two boxes on each
    picture (and a keypoint), train a few steps; then Compose lists it and shows its strength, a LoRA file is added
    to the LoRA list, and the image's PNG names both."""
    expect = sync_api.expect
    studio = served_studio[0]
    page.reload()
    page.wait_for_selector("#canvas .tc-stage")
    page.get_by_role("tab", name="Relations").click()
    words = page.locator("#relation-words input, #relation-words textarea").first
    words.fill("leaning on")
    words.press("Tab")
    page.locator("#relation-examples input[type=file]").set_input_files(relation_pictures(tmp_path / "pictures"))
    expect(page.locator("#relation-template textarea, #relation-template input").first).to_have_value(
        "{a} leaning on {b}"
    )  # filled from the words when the words box was left
    expect(page.locator("#relation-example-summary")).to_contain_text("0 of 3 examples ready")
    expect(page.locator("#relation-example-image img")).to_be_visible()

    page.locator("#relation-example-prompt textarea").fill("a red box leaning on a blue tent on grass")
    page.locator("#relation-phrase-a textarea, #relation-phrase-a input").first.fill("red box")
    page.locator("#relation-phrase-b textarea, #relation-phrase-b input").first.fill("blue tent")
    expect(page.locator("#relation-example-summary")).to_contain_text("the box of A")
    page.locator("#relation-copy-all").click()
    expect(page.locator("#relation-example-summary")).to_contain_text("words copied to all 3 examples")
    for index in range(3):
        expect(page.locator("#relation-example input")).to_have_value(f"{index:02d}.png")
        expect(page.locator("#relation-example-summary")).to_contain_text(f"{index:02d}.png: needs")  # it is shown
        for x0, y0, x1, y1 in (BOX_A, BOX_B):  # "Box of A" is picked; after A's box comes B's
            _click_picture(page, x0, y0)
            _click_picture(page, x1, y1)
        expect(page.locator("#relation-example-summary")).to_contain_text(f"{index + 1} of 3 examples ready")
        if index == 0:  # one keypoint on A, the top of the leaning block
            page.locator("#relation-click-mode").get_by_text("Keypoints of A").click()
            _click_picture(page, 0.3, 0.2)
            expect(page.locator("#relation-example-summary")).to_contain_text("keypoints A 1, B 0")
            page.locator("#relation-click-mode").get_by_text("Box of A").click()
        page.locator("#relation-next").click()
    page.screenshot(path=str(ARTIFACTS / "studio-relation-examples.png"), full_page=True)

    page.locator("#relation-steps input[type=number]").fill("3")
    page.locator("#relation-steps input[type=number]").press("Enter")
    page.locator("#relation-train").click()
    expect(page.locator("#relation-status")).to_contain_text("is learned", timeout=120_000)
    expect(page.locator("#relation-list")).to_contain_text("{a} leaning on {b}")
    (learned,) = [r for r in studio.learned_relations() if r.name == "leaning on"]
    for got, wanted in zip(learned.boxes, (BOX_A, BOX_B)):  # the clicks reached the engine where they were made
        assert max(abs(g - w) for g, w in zip(got, wanted)) < 0.02, (got, wanted)
    page.screenshot(path=str(ARTIFACTS / "studio-relation-learned.png"), full_page=True)

    # --- Compose: the learned relation is in the picker, with its strength
    page.get_by_role("tab", name="Compose").click()
    expect(page.locator("#relation-scale")).to_be_hidden()
    _pick(page, "relation", "A leaning on B · learned")
    expect(page.locator("#relation-scale")).to_be_visible()
    _pick(page, "relation-a", "red box", custom=True)
    _pick(page, "relation-b", "blue tent", custom=True)
    expect(page.locator("#prompt textarea")).to_have_value(re.compile(r"^red box leaning on blue tent"))
    # and a LoRA file in the LoRA list (here the relation's own, exported in kohya's format)
    lora = studio.export_relation("leaning on", tmp_path / "leaning-kohya.safetensors", "kohya")
    page.locator("#lora-card").get_by_text("LoRAs", exact=True).click()
    with page.expect_file_chooser() as chooser:
        page.locator("#lora-upload").click()
    chooser.value.set_files(str(lora))
    expect(page.locator("#lora-list")).to_contain_text("leaning-kohya.safetensors")
    page.locator("#steps input[type=number]").fill("3")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate-btn").click()
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=60_000)
    image = page.locator("#result-gallery img").first
    (tmp_path / "related.png").write_bytes(page.request.get(image.get_attribute("src")).body())
    with Image.open(tmp_path / "related.png") as result:
        request = json.loads(result.text["troupe"])["request"]
    assert (request["relation"], request["relation_scale"]) == ("leaning on", 1.0)
    assert [(Path(lo["path"]).name, lo["scale"]) for lo in request["loras"]] == [("leaning-kohya.safetensors", 1.0)]
    page.screenshot(path=str(ARTIFACTS / "studio-relation-generated.png"), full_page=True)
