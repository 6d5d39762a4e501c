"""Property-based tests (hypothesis) for the inputs a person or a client hands Troupe: command lines, canvas JSON,
project files, subject imports (safetensors headers included) and PNG metadata when reused.

The property, for every kind: the documented result or one InputError line (argparse's usage error, exit code 2, for
the command line), never another exception, and the subject library byte-identical afterwards unless the input was
a valid command that changes it. The default suite runs a few examples of each kind; TROUPE_FUZZ_EXAMPLES=2000 runs
the big ones (docs/reliability.md has the command and the counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engines.library import SubjectLibrary
from engines.png_import import open_png
from engines.project import parse_project, read_project
from engines.types import InputError, SubjectInfo
from studio.__main__ import main
from studio.ui.canvas import canvas_to_layout

EXAMPLES = int(os.environ.get("TROUPE_FUZZ_EXAMPLES", "15"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# JSON values of every shape, deep ones included (RecursionError was one of issue 20's findings)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
deep = st.integers(1, 60_000).map(lambda n: "[" * n + "]" * n)
odd_text = st.text(max_size=40) | deep | st.sampled_from(["", "{", "null", "NaN", "1e999", '{"a": Infinity}'])


def mutated(base: dict, keys: list[str]):
    """`base` with some of its keys (and some new ones) set to arbitrary JSON, or deleted."""
    change = st.dictionaries(st.sampled_from([*keys, "extra"]), json_values | st.just(None), max_size=3)
    return change.map(lambda c: {k: v for k, v in {**base, **c}.items() if not (k in c and c[k] is None)})


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def make_library(root: Path) -> SubjectLibrary:
    library = SubjectLibrary(root)
    info = SubjectInfo("rex", "dog", "demo", "abc", "2026-01-01T00:00:00+00:00", 2, (1.0, 0.5))
    image, mask = Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("L", (64, 64), 255)
    library.add(info, {"text_encoder": torch.randn(1, 128)}, [image], [mask])
    return library


@pytest.fixture(scope="module")
def workspace():
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        library = make_library(root / "lib")
        exported = library.export("rex", root / "rex.safetensors")
        yield root, library, exported


def one_line_or_result(call):
    """Run `call`; an InputError is the documented refusal (one line), anything else but a result fails the test."""
    try:
        return call(), None
    except InputError as error:
        assert "\n" not in str(error), f"a refusal of more than one line: {error!r}"
        return None, error


# ------------------------------------------------------------------------------------------------ canvas JSON
VALID_CANVAS = {"width": 64, "height": 64, "regions": [{"id": "r1", "label": "dog", "box": [0.1, 0.1, 0.6, 0.6]}]}
canvas_regions = mutated(VALID_CANVAS["regions"][0], ["id", "label", "box", "layer"])
canvases = (
    mutated(VALID_CANVAS, ["width", "height", "regions", "suggestions"]).map(json.dumps)
    | st.lists(canvas_regions, max_size=3).map(lambda rs: json.dumps({**VALID_CANVAS, "regions": rs}))
    | json_values.map(json.dumps)
    | odd_text
)


@FUZZ
@given(text=canvases)
def test_canvas_json(text):
    one_line_or_result(lambda: canvas_to_layout(text, {"rex": "dog"}))


# ------------------------------------------------------------------------------------------------ project files
VALID_PROJECT = {"format": "troupe-project", "version": 1, "request": {"prompt": "a dog"},
                 "canvas": {"width": 512, "height": 512}, "subjects": {}, "model": "demo"}  # fmt: skip
projects = mutated(VALID_PROJECT, list(VALID_PROJECT)) | st.builds(
    lambda request: {**VALID_PROJECT, "request": request},
    mutated({"prompt": "a dog", "seed": 3, "steps": 4, "layout": {"regions": []}}, ["prompt", "seed", "layout", "cfg"]),
)


@FUZZ
@given(data=projects | json_values, raw=odd_text)
def test_project_files(data, raw, workspace):
    one_line_or_result(lambda: parse_project(data))
    path = workspace[0] / "fuzz.troupe.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(data), encoding="utf-8")
    one_line_or_result(lambda: read_project(path))


# ------------------------------------------------------------------------------------------------ subject imports
DTYPES = {"U8": 1, "I64": 8, "F32": 4, "F16": 2, "BOOL": 1, "X": 1}
tensor_names = st.sampled_from(["troupe.subject.format", "troupe.subject.residual.text_encoder",
    "troupe.subject.residual.text_encoder_2", "troupe.subject.photo.0", "troupe.subject.mask.0",
    "troupe.subject.thumbnail", "text_encoder", "photo.0", "other"])  # fmt: skip
tensor_specs = st.tuples(tensor_names, st.sampled_from(list(DTYPES)), st.lists(st.integers(-1, 70), max_size=3))


def safetensors_bytes(specs, metadata, tail: bytes) -> bytes:
    """A file in the safetensors layout: 8-byte header length, JSON header, then the tensors' bytes."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = DTYPES[dtype] * max(0, int(torch.tensor(shape).prod()) if shape else 1)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(min(offset, 1 << 16)) + tail


def export_meta(exported: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as file:
        return json.loads(file.metadata()["troupe_subject"])


@FUZZ
@given(data=st.data())
def test_subject_imports(data, workspace):
    root, library, exported = workspace
    meta = export_meta(exported)
    choice = data.draw(st.sampled_from(["header", "mutated file", "mutated meta"]))
    if choice == "header":
        metadata = data.draw(st.none() | st.dictionaries(st.sampled_from(["troupe_subject", "x"]), odd_text))
        blob = safetensors_bytes(data.draw(st.lists(tensor_specs, max_size=5)), metadata, data.draw(st.binary()))
    elif choice == "mutated file":
        blob = bytearray(exported.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(0, len(blob)))])
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file

        new_meta = data.draw(mutated(meta, list(meta)))
        with safe_open(str(exported), framework="pt") as file:
            tensors = {k: file.get_tensor(k) for k in file.keys()}
        dropped = data.draw(st.sets(st.sampled_from(sorted(tensors))))
        path = root / "meta.safetensors"
        save_file(
            {k: v for k, v in tensors.items() if k not in dropped}, str(path), {"troupe_subject": json.dumps(new_meta)}
        )
        blob = path.read_bytes()
    path = root / "fuzz.safetensors"
    path.write_bytes(blob)
    name = data.draw(st.sampled_from([None, "ada", "Rex", "CON", "../x", "rex"]))
    before = snapshot(library.root)
    info, error = one_line_or_result(lambda: library.import_file(path, name=name))
    if error is not None:
        assert snapshot(library.root) == before, "a refused import changed the library"
    else:
        library.delete(info.name)  # a valid file was imported: put the library back as it was
        assert snapshot(library.root) == before


# ------------------------------------------------------------------------------------------------ PNG metadata reuse
VALID_TROUPE = {"version": 2, "request": {"prompt": "a dog", "seed": 1}, "model": {"source": "demo"}}
png_texts = st.dictionaries(
    st.sampled_from(["troupe", "parameters", "prompt", "workflow"]),
    odd_text
    | mutated(VALID_TROUPE, list(VALID_TROUPE)).map(json.dumps)
    | st.builds(
        lambda p, n, line: f"{p}\nNegative prompt: {n}\n{line}",
        st.text(max_size=20),
        st.text(max_size=10),
        st.text(max_size=60),
    )  # fmt: skip
    | json_values.map(json.dumps),
    max_size=3,
)


@FUZZ
@given(texts=png_texts)
def test_png_metadata_when_reused(texts, workspace):
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value.replace("\x00", ""))
    path = workspace[0] / "fuzz.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    one_line_or_result(lambda: open_png(path))


# ------------------------------------------------------------------------------------------------ command lines
OPTIONS = ["--prompt", "--box", "--seed", "--steps", "--cfg", "--width", "--height", "--num-images", "--out",
           "--scheduler", "--guidance", "--negative", "--lora", "--relation", "--pair", "--reuse", "--device",
           "--dtype", "--name", "--class", "--preset", "--json", "--repair", "--no-photos", "--fit"]  # fmt: skip
tokens = (
    st.sampled_from(OPTIONS)
    | st.text(max_size=20).filter(lambda t: "\x00" not in t)
    | st.sampled_from(
        [
            "0",
            "-1",
            str(2**63 - 1),
            "1e999",
            "nan",
            "dog=0,0,1,1",
            "<rex>=0,0,2,1",
            "x.png",
            "/proc/x.png",
            "/dev/null",
            "rex",
            "Rex",
            "CON",
            "tpu:9",
            "/etc/passwd",
        ]  # fmt: skip
    )
)
commands = st.sampled_from([["generate"], ["register"], ["subjects", "list"], ["subjects", "check"],
    ["subjects", "delete"], ["subjects", "rename"], ["subjects", "export"], ["subjects", "import"]])  # fmt: skip


@FUZZ
@given(command=commands, argv=st.lists(tokens, max_size=8))
def test_command_lines(command, argv, workspace):
    root, library, _ = workspace
    # no model is ever loaded: a command that gets that far meets a model path that does not exist (one line)
    model = ["--model", str(root / "no-model")] if command[0] in ("generate", "register") else []
    full = [*command, *argv, *model, "--library", str(library.root)]
    before = snapshot(library.root)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(full)
        except SystemExit as exit_:  # argparse: a usage line and exit code 2 (or 0 for --help)
            code = exit_.code
    assert code in (0, 1, 2), f"{full}: exit code {code}"
    assert "Traceback" not in err.getvalue()
    if code != 0:
        assert snapshot(library.root) == before, f"{full} failed and changed the library"
    elif snapshot(library.root) != before:  # a valid delete, rename or import: start again from the same library
        import shutil

        shutil.rmtree(library.root)
        make_library(library.root)
