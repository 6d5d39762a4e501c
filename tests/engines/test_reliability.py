"""Issue 20's findings, one test each: names without case, device names, class words, residual bounds, broken imports,
photos refused before any work, the library's integrity check, and checks that come before the expensive work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engines.images import check_photos, load_photo
from engines.library import SubjectLibrary
from engines.library_check import check_library
from engines.relations.library import check_relation_name
from engines.subject_files import EXPORT_KEY, MAX_RESIDUAL_RMS, check_class_tokens, check_residuals
from engines.types import GenerateRequest, InputError, RegisterRequest, SubjectInfo, check_subject_name
from engines.types.checks import printable
from engines.types.subjects import check_class_word


def info(name="rex", class_word="dog") -> SubjectInfo:
    return SubjectInfo(name, class_word, "demo", "abc", "2026-01-01T00:00:00+00:00", 2, (1.0, 0.5))


def add(library, name="rex", class_word="dog", rows=None):
    residuals = {"text_encoder": rows if rows is not None else torch.randn(1, 128)}
    photos = [Image.new("RGB", (64, 64), (200, 30, 30))]
    return library.add(info(name, class_word), residuals, photos, [Image.new("L", (64, 64), 255)])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: 'byte-identical afterwards' as a value."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def library(tmp_path) -> SubjectLibrary:
    return SubjectLibrary(tmp_path / "lib")


# ------------------------------------------------------------------------------------------------ names (item 4)
def test_names_differing_only_in_case_are_one_subject(library):
    add(library, "stripy")
    before = snapshot(library.root)
    with pytest.raises(InputError, match="'stripy' already exists.*without case"):
        add(library, "Stripy")
    with pytest.raises(InputError, match="did you mean 'stripy'"):
        library.get("Stripy")
    add(library, "other")
    with pytest.raises(InputError, match="already exists"):
        library.rename("other", "STRIPY")
    library.delete("other")
    assert snapshot(library.root) == before
    assert library.rename("stripy", "Stripy").name == "Stripy"  # a case-only rename is allowed
    assert library.names() == ["Stripy"]


def test_prompt_names_are_exact_and_the_near_miss_is_named():
    from engines.types import unknown_subject

    assert "did you mean <stripy>" in str(unknown_subject("Stripy", ["stripy", "rex"]))
    assert "registered: <rex>" in str(unknown_subject("milo", ["rex"]))


@pytest.mark.parametrize("name", ["CON", "con", "Nul", "aux", "prn", "COM1", "lpt9", "com3"])
def test_windows_device_names_are_refused(name):
    with pytest.raises(InputError, match="device name on Windows"):
        check_subject_name(name)
    with pytest.raises(InputError, match="device name on Windows"):
        check_relation_name(name)
    assert check_subject_name(name + "x") == name + "x" and check_subject_name("console") == "console"


# ------------------------------------------------------------------------------------------------ class words
@pytest.mark.parametrize(
    "word, message",
    [
        ("x" * 101, "at most 100 characters"),
        ("🐶", "has 🐶"),
        ("dog\x1b[31m", "control characters"),
        ("dog\ncat", "control characters"),
        ("   ", "empty"),
        ("dog<b>", "has < >"),
    ],
)
def test_bad_class_words_are_one_line_before_any_work(word, message):
    with pytest.raises(InputError, match=message):
        RegisterRequest("rex", word, ("a.png",))


def test_good_class_words_of_any_language_pass():
    for word in ("dog", "teddy bear", "T-shirt", "children's toy", "chien", "猫", "café au lait", "x" * 100):
        assert check_class_word(word) == word


def test_class_words_that_do_not_fit_the_tokenizer_are_refused(sd15):
    check_class_tokens(sd15.tokenizers, "dog")
    with pytest.raises(InputError, match="tokens of the text encoder"):
        check_class_tokens(sd15.tokenizers, " ".join(["dog"] * 60))


def test_printing_escapes_control_characters():
    assert printable("dog\x1b[2J\n") == "dog\\x1b[2J\\n"
    assert printable("café") == "café"


# ------------------------------------------------------------------------------------------------ residuals, imports
def test_an_absurd_residual_is_refused():
    check_residuals({"text_encoder": torch.full((1, 768), 5.0)}, "x")
    for value in (1e30, MAX_RESIDUAL_RMS * 1.01):
        with pytest.raises(InputError, match="absurdly large"):
            check_residuals({"text_encoder": torch.full((1, 768), value)}, "x")


def test_imports_of_broken_files_are_one_line_and_change_nothing(library, tmp_path):
    add(library)
    exported = library.export("rex", tmp_path / "out" / "rex.safetensors")
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as file:
        header, tensors = file.metadata(), {k: file.get_tensor(k) for k in file.keys()}
    before = snapshot(library.root)
    cases = {
        "no_photos": ({k: v for k, v in tensors.items() if ".photo." not in k}, header),
        "nested": (tensors, {EXPORT_KEY: "[" * 100_000 + "]" * 100_000}),
        "huge": ({**tensors, "troupe.subject.residual.text_encoder": torch.full((1, 128), 1e30)}, header),
        "emoji": (tensors, {EXPORT_KEY: json.dumps({**json.loads(header[EXPORT_KEY]), "class_word": "dog\x1b"})}),
    }
    for case, (case_tensors, case_header) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(case_tensors, str(path), metadata=case_header)
        with pytest.raises(InputError):
            library.import_file(path, name="other")
    for bad in (tmp_path, tmp_path / "missing.safetensors"):
        with pytest.raises(InputError):
            library.import_file(bad, name="other")
    assert snapshot(library.root) == before


def test_exports_to_devices_folders_or_the_library_are_refused(library, tmp_path):
    add(library)
    for dest in ("/dev/null", library.root / "rex.safetensors", library.root):
        with pytest.raises(InputError):
            library.export("rex", dest)
    assert library.export("rex", tmp_path).name == "rex.safetensors"  # a folder still takes <name>.safetensors


# ------------------------------------------------------------------------------------------------ photos
def test_photos_are_refused_with_the_right_reason(tmp_path):
    (tmp_path / "folder.png").mkdir()
    Image.new("RGBA", (96, 96), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (4000, 40), (200, 0, 0)).save(tmp_path / "strip.png")
    for name, message in (("folder.png", "is a folder"), ("clear.png", "fully transparent"),
                          ("strip.png", "too long and thin"), ("none.png", "no such file")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            check_photos([str(tmp_path / name)])


def test_a_16_bit_greyscale_png_keeps_its_greys(tmp_path):
    ramp = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    pixels = np.asarray(load_photo(tmp_path / "grey16.png"))
    assert pixels.shape == (96, 96, 3) and abs(pixels.mean() - 127.5) < 2 and pixels.min() == 0


def test_register_checks_photos_before_the_model_loads(tmp_path):
    from engines.service import Studio
    from engines.types import ModelSpec

    studio = Studio(ModelSpec("/nonexistent/model"), tmp_path / "lib")
    with pytest.raises(InputError, match="photo nothing.png: no such file"):
        studio.register(RegisterRequest("rex", "dog", (str(tmp_path / "nothing.png"),)))
    assert studio._bundle is None


# ------------------------------------------------------------------------------------------------ integrity (item 5)
def test_check_reports_and_repair_moves_broken_entries_aside(library):
    add(library, "rex")
    add(library, "milo")
    (library.root / "milo" / "subject.json").write_text("[" * 50_000)  # RecursionError for json
    (library.root / "notes.txt").write_text("mine")
    (library.root / "bad name").mkdir()
    (library.root / "CON").mkdir()
    broken_meta = library.root / "ada"
    broken_meta.mkdir()
    (broken_meta / "subject.json").mkdir()  # a folder where a file belongs
    assert library.names() == ["rex"]  # the listing skips them, never crashes
    found = {p.entry: p.problem for p in check_library(library)}
    assert set(found) == {"ada", "milo", "notes.txt", "bad name", "CON"}
    assert "not valid JSON" in found["milo"] and "unreadable" in found["ada"]
    moved = check_library(library, repair=True)
    assert all(p.moved_to and p.moved_to.startswith(".broken/") for p in moved)
    assert (library.root / moved[0].moved_to).exists()  # moved, not deleted
    assert check_library(library) == [] and library.names() == ["rex"]
    assert (library.root / ".broken").is_dir()


def test_check_finds_case_duplicates_and_huge_residuals(library):
    add(library, "stripy")
    (library.root / "Stripy").mkdir()
    for path in (library.root / "stripy").iterdir():
        (library.root / "Stripy" / path.name).write_bytes(path.read_bytes())
    meta = json.loads((library.root / "Stripy" / "subject.json").read_text())
    (library.root / "Stripy" / "subject.json").write_text(json.dumps({**meta, "name": "Stripy"}))
    save_file({"text_encoder": torch.full((1, 128), 1e30)}, str(library.root / "stripy" / "residuals.safetensors"))
    found = {p.entry: p.problem for p in check_library(library)}
    assert "absurdly large" in found["stripy"]
    assert "only in case" in found.get("Stripy", "only in case")  # reported unless its twin was already broken


def test_a_request_refuses_a_seed_whose_last_image_overflows_and_fields_of_the_wrong_type():
    """The UI, batch job lines and project files build requests too: the check is the request's, before any work."""
    assert GenerateRequest("a ball", seed=2**63 - 2, num_images=2).seed == 2**63 - 2
    with pytest.raises(InputError, match="image k of 2 uses seed"):
        GenerateRequest("a ball", seed=2**63 - 1, num_images=2)
    with pytest.raises(InputError, match="prompt must be text"):
        GenerateRequest.from_dict({"prompt": 7})
