"""Property-based tests (hypothesis) for job files (engines/batch/jobs.py), relation example folders
(engines/relations/examples.py) and the `relations` and `batch` command lines, in the style of test_fuzz_inputs.py:
the documented result or one InputError line (argparse's usage error, exit 2), never another exception; the library,
the example folder and the output folder unchanged by a refused input. TROUPE_FUZZ_EXAMPLES=2000 for the big runs."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from engines.batch.jobs import read_jobs
from engines.relations.examples import read_examples
from engines.types import InputError
from studio.__main__ import main
from tests.engines.test_relation_learning import write_examples
from tests.test_fuzz_inputs import FUZZ, json_values, make_library, mutated, odd_text, snapshot

JOB = {"prompt": "a red ball next to a blue box", "seed": 3, "steps": 4, "width": 64, "height": 64}
JOB_KEYS = [*JOB, "negative_prompt", "cfg", "scheduler", "num_images", "layout", "relation", "name", "seeds", "request",
            "version", "guidance", "references"]  # fmt: skip
job_lines = (
    mutated(JOB, JOB_KEYS).map(json.dumps)
    | mutated({"request": JOB, "version": 2}, ["request", "version", "extra"]).map(json.dumps)
    | json_values.map(json.dumps)
    | odd_text
)


@pytest.fixture(scope="module")
def workspace():
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        yield root, make_library(root / "lib"), write_examples(root / "leaning")


@FUZZ
@given(lines=st.lists(job_lines, min_size=1, max_size=4))
def test_job_files(lines, workspace):
    root = workspace[0]
    path = root / "jobs.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        jobs = read_jobs(path)
    except InputError as error:
        assert "\n" not in str(error)
        event("the file refused")
        return
    event(f"jobs read: {'some' if jobs.jobs else 'none'}, bad lines: {'some' if jobs.problems else 'none'}")
    numbered = len(path.read_text(encoding="utf-8", errors="surrogatepass").splitlines())  # \r too ends a line
    for problem in jobs.problems:  # a bad line is named by its number, in one line
        assert 1 <= problem.line <= numbered and "\n" not in problem.message
    assert all(job.request.steps >= 1 for job in jobs.jobs)


def _entry(index: int) -> dict:
    red = {"phrase": "red box", "box": [0.1, 0.15, 0.55, 0.95]}
    blue = {"phrase": "blue tent", "box": [0.56, 0.3, 0.94, 0.94], "keypoints": [[0.75, 0.6]]}
    return {"image": f"{index:02d}.png", "prompt": "a red box leaning on a blue tent on grass", "objects": [red, blue]}


paths = st.sampled_from(["00.png", "../00.png", "/etc/passwd", "missing.png", "relation.json", ".", "", "00.png/x",
                         "%2e%2e/00.png", "sub/../00.png", "/dev/zero"])  # fmt: skip
objects = mutated(_entry(0)["objects"][0], ["phrase", "box", "mask", "keypoints"]) | json_values
entries = st.builds(lambda e, o, p: {**e, "objects": o, "image": p}, mutated(_entry(1), ["image", "prompt", "objects"]),
                    st.lists(objects, max_size=3), paths) | json_values  # fmt: skip
GOOD = {"relation": "leaning on", "template": "{a} leaning on {b}", "examples": [_entry(i) for i in range(3)]}
relation_files = (
    mutated(GOOD, ["relation", "template", "examples", "layers", "mirror"])  # the top level changed
    | st.lists(entries, max_size=3).map(lambda e: {**GOOD, "examples": [_entry(0), _entry(1), _entry(2), *e]})
    | st.tuples(st.integers(0, 2), objects, st.integers(0, 1)).map(lambda c: _one_object(*c))  # one object changed
)


def _one_object(index: int, item, slot: int) -> dict:
    examples = [_entry(i) for i in range(3)]
    examples[index]["objects"][slot] = item
    return {**GOOD, "examples": examples}


@FUZZ
@given(data=relation_files | json_values, raw=st.none() | odd_text)
def test_relation_example_folders(data, raw, workspace):
    folder = workspace[2]
    original = (folder / "relation.json").read_bytes()
    images = {k: v for k, v in snapshot(folder).items() if k != "relation.json"}
    (folder / "relation.json").write_text(raw if raw is not None else json.dumps(data), errors="surrogatepass")
    try:
        examples = read_examples(folder)
        assert 3 <= len(examples.examples) and examples.relation.arity == 2
        event("examples read")
    except InputError as error:
        assert "\n" not in str(error)
        event("refused")
    finally:
        (folder / "relation.json").write_bytes(original)
    assert {k: v for k, v in snapshot(folder).items() if k != "relation.json"} == images


OPTIONS = ["--name", "--steps", "--rank", "--seed", "--learning-rate", "--keypoints", "--no-keypoints", "--exemplars",
           "--format", "--json", "--out", "--check", "--strict", "--retries", "--help"]  # fmt: skip
VALUES = ["0", "-1", "1e999", "nan", str(2**63), "leaning on", "Leaning On", "CON", "/etc/passwd", "/dev/null",
          "/proc/x", "diffusers", "kohya", "../x", "x.safetensors"]  # fmt: skip
# each command with a well-formed start (so hostile values reach past argparse), or without one
commands = st.sampled_from([["relations", "list"], ["relations", "train", "FOLDER"], ["relations", "export",
    "leaning on", "OUT"], ["relations", "import", "JOBS"], ["relations", "rename", "leaning on", "x"],
    ["relations", "delete", "leaning on"], ["batch", "JOBS", "--out", "OUT"], ["batch", "JOBS", "--check",
    "--out", "OUT"]]).flatmap(lambda c: st.sampled_from([c, c[: 1 + (c[0] == "relations")]]))  # fmt: skip


@FUZZ
@given(command=commands, argv=st.lists(st.sampled_from(OPTIONS + VALUES + ["FOLDER", "JOBS", "OUT"])
                                       | st.text(max_size=16).filter(lambda t: "\x00" not in t), max_size=7))  # fmt: skip
def test_relations_and_batch_command_lines(command, argv, workspace):
    root, library, folder = workspace
    jobs, out = root / "jobs.jsonl", root / "out"
    jobs.write_text(json.dumps(JOB) + "\n")
    places = {"FOLDER": str(folder), "JOBS": str(jobs), "OUT": str(out)}
    # no model is ever loaded: a command that gets that far meets a model path that does not exist (one line)
    model = ["--model", str(root / "no-model")] if command[0] == "batch" or command[1] == "train" else []
    full = [*[places.get(a, a) for a in [*command, *argv]], *model, "--library", str(library.root)]
    before = snapshot(library.root), snapshot(folder), snapshot(out) if out.exists() else {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(full)
        except SystemExit as exit_:  # argparse: a usage line and exit code 2 (or 0 for --help)
            code = exit_.code
    assert code in (0, 1, 2), f"{full}: exit code {code}"
    assert "Traceback" not in err.getvalue()
    event(f"exit {code}")
    after = snapshot(library.root), snapshot(folder), snapshot(out) if out.exists() else {}
    assert after[1] == before[1], f"{full} changed the example folder"
    if code != 0:
        assert after == before, f"{full} failed and changed the library or the outputs"
    shutil.rmtree(out, ignore_errors=True)
    if after[0] != before[0]:  # a valid command that changed the library: start again from the same one
        shutil.rmtree(library.root)
        make_library(library.root)
