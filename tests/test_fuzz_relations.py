"""Property-based tests (hypothesis) for relation imports (engines/relations/library.py, `relations import`) and the
command lines of `bench`, `references` and `ui`, in the style of test_fuzz_inputs.py.

Relation imports: the relation, or one InputError line, never another exception; the relation library byte-identical
after a refusal; and a file that is taken in holds what a later generation can merge: finite LoRA pairs of the card's
rank on the cross-attention, read back through diffusers. Command lines: exit code 0, 1 or 2, no traceback, the
library unchanged by a failing command; no command here starts real work (the entry points that would are replaced
by one that stops at once, and a command that reaches one counts as valid). TROUPE_FUZZ_EXAMPLES=2000: the big runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from engines.relations.library import CARD_KEY, RelationLibrary
from engines.types import RelationInfo
from studio.__main__ import main
from tests.test_fuzz_inputs import DTYPES, FUZZ, json_values, make_library, mutated, odd_text, one_line_or_result
from tests.test_fuzz_inputs import snapshot as _snapshot

# demo-model shapes (cross-attention width 128; 32 and 128 channels): two attention blocks, rank 2
BLOCKS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": 32, "mid_block.attentions.0.transformer_blocks.0.attn2": 128}  # fmt: skip
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
RANK, TEXT_WIDTH = 2, 128


def snapshot(root: Path) -> dict[str, str]:
    return _snapshot(root) if root.exists() else {}


def relation_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator, weights = torch.Generator().manual_seed(seed), {}
    for block, channels in BLOCKS.items():
        for projection in PROJECTIONS:
            width = TEXT_WIDTH if projection in ("to_k", "to_v") else channels
            weights[f"{block}.{projection}.lora_A.weight"] = torch.randn(RANK, width, generator=generator) * 0.1
            weights[f"{block}.{projection}.lora_B.weight"] = torch.randn(channels, RANK, generator=generator) * 0.1
    return weights


def relation_info(name: str = "leaning") -> RelationInfo:
    boxes = ((0.05, 0.2, 0.5, 0.9), (0.45, 0.2, 0.95, 0.9))
    return RelationInfo(name, "leaning on", "{a} leaning on {b}", boxes, (0, 1), "demo", "abc",
                        "2026-01-01T00:00:00+00:00", 10, RANK, 0.0, 3, 1.5, "", (0.5, 0.25))  # fmt: skip


@pytest.fixture(scope="module")
def workspace():
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_library(root / "lib")
        relations = RelationLibrary(root / "lib")
        relations.add(relation_info(), relation_weights())
        exports = {fmt: relations.export("leaning", root / f"{fmt}.safetensors", fmt) for fmt in ("diffusers", "kohya")}
        yield root, relations, exports


def read_all(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}, {k: handle.get_tensor(k) for k in handle.keys()}


# ------------------------------------------------------------------------------------------------ files to import
tensor_names = st.sampled_from([f"unet.{b}.{p}.lora_{ab}.weight" for b in BLOCKS for p in PROJECTIONS for ab in "AB"]
                               + ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                                  "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
                                  "unet.x.lora_A.weight", "text_encoder.lora_A.weight", "lora", "other"])  # fmt: skip
sizes = st.integers(-1, 130) | st.sampled_from([2**40, 2**64 - 1])
tensor_specs = st.tuples(tensor_names, st.sampled_from(list(DTYPES)), st.lists(sizes, max_size=3))


def raw_file(specs, metadata, length: int | None, tail: bytes) -> bytes:
    """The safetensors layout by hand (8-byte header length, JSON header, data), with any sizes and any length."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = DTYPES[dtype] * max(0, math.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(min(offset, 1 << 16)) + tail


def card_json(info: RelationInfo) -> dict:
    from engines.relations.library import info_to_card

    return json.loads(json.dumps(info_to_card(info)))


huge = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 1e308])
boxes = st.lists(st.lists(st.floats() | huge | st.integers(-2, 2) | st.text(max_size=3), max_size=5), max_size=3)
names = st.sampled_from(["leaning", "Leaning", "LEANING", "../x", "CON", "nul", "a/b", "", " ", ".x", "ok-name"])
CARD_CHANGES = {"boxes": boxes, "name": names | st.text(max_size=10), "rank": st.integers(-1, 200) | huge | json_values,
                "loss_curve": st.lists(st.floats() | huge, max_size=3) | json_values}  # fmt: skip


@st.composite
def cards(draw) -> str:
    card = card_json(relation_info())
    if draw(st.booleans()):
        for key in draw(st.sets(st.sampled_from(sorted(CARD_CHANGES)), min_size=1)):
            card[key] = draw(CARD_CHANGES[key])
    else:
        card = draw(mutated(card, list(card)))
    return json.dumps(card)  # NaN and Infinity too: json writes them, as a hand-edited card might


VALUES = {"nan": math.nan, "inf": math.inf, "huge": 1e30, "big": 5e3, "zero": 0.0}


@st.composite
def changed_tensors(draw, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dropped tensors, other shapes, absurd values, other dtypes, keys that are no LoRA of the cross-attention."""
    tensors = dict(tensors)
    for key in draw(st.sets(st.sampled_from(sorted(tensors)), max_size=2)):
        del tensors[key]
    for key in draw(st.sets(st.sampled_from(sorted(tensors)), max_size=2)) if tensors else ():
        how = draw(st.sampled_from(["shape", "value", "dtype", "rename", "scalar"]))
        value = tensors.pop(key)
        if how == "shape":
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 130), max_size=3)))
        elif how == "value":
            shape, value = (
                value.shape,
                value.clone().reshape(-1).to(value.dtype if value.is_floating_point() else torch.float64),
            )
            value[draw(st.integers(0, max(0, value.numel() - 1)))] = VALUES[draw(st.sampled_from(sorted(VALUES)))]
            value = value.reshape(shape)
            tensors[key] = value if draw(st.booleans()) else value.reshape(-1)
        elif how == "dtype":
            tensors[key] = value.to(draw(st.sampled_from([torch.int64, torch.float16, torch.bool, torch.float64])))
        elif how == "rename":
            tensors[draw(st.sampled_from(["unet.conv_in.lora_A.weight", key.replace("attn2", "attn1"), "x" + key,
                                          key.replace("unet.", "text_encoder."), "lora"]))] = value  # fmt: skip
        else:
            tensors[key] = torch.tensor(VALUES[draw(st.sampled_from(sorted(VALUES)))])
    if draw(st.booleans()):
        tensors[draw(tensor_names)] = torch.randn(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    return tensors


@st.composite
def relation_files(draw, exports: dict[str, Path]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["header", "bytes", "card", "tensors", "as exported"]))
    event(f"relation file: {kind}")
    if kind == "as exported":
        return kind, exports[draw(st.sampled_from(sorted(exports)))].read_bytes()
    if kind == "header":
        metadata = draw(st.none() | json_values | st.dictionaries(st.sampled_from([CARD_KEY, "x"]), odd_text | cards()))
        length = draw(st.none() | st.integers(0, 2**64 - 1))
        return kind, raw_file(draw(st.lists(tensor_specs, max_size=5)), metadata, length, draw(st.binary(max_size=64)))
    path = exports[draw(st.sampled_from(sorted(exports)))]
    if kind == "bytes":
        blob = bytearray(path.read_bytes())
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(blob[: draw(st.integers(0, len(blob)))])
    metadata, tensors = read_all(path)
    if kind == "card":
        metadata[CARD_KEY] = draw(cards())
    else:
        tensors = draw(changed_tensors(tensors))
    buffer = Path(tempfile.mkstemp(suffix=".safetensors")[1])
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(buffer), metadata)
        return kind, buffer.read_bytes()
    finally:
        buffer.unlink()


def assert_mergeable(info: RelationInfo) -> None:
    """What generation will do with an accepted relation: read it through diffusers and merge B·A (engines/loras.py)."""
    from diffusers import StableDiffusionPipeline

    from engines.loras import _read_cached, read_lora

    _read_cached.cache_clear()  # the same path over and over: never a cached reading of an earlier file
    updates = read_lora(info.lora, StableDiffusionPipeline)
    assert updates and all(u.part == "unet" and ".attn2." in u.module for u in updates)
    for update in updates:
        assert update.down.shape[0] == update.up.shape[1] == info.rank, update.module
        delta = update.up @ update.down * update.scale  # (out, in)
        assert torch.isfinite(delta).all() and delta.abs().max() < 1e6, update.module
        assert update.module.endswith(("to_q", "to_out.0")) or update.down.shape[1] == TEXT_WIDTH


@FUZZ
@given(data=st.data())
def test_relation_imports(data, workspace):
    root, relations, exports = workspace
    path = root / "fuzz.safetensors"
    kind, blob = data.draw(relation_files(exports))
    path.write_bytes(blob)
    name = data.draw(st.one_of(st.just("fresh"), st.just("fresh"), st.none(), names))  # mostly a free name
    before = snapshot(relations.root)
    if data.draw(st.booleans()):  # through the command line: exit 0 or one line and exit 2
        argv = ["relations", "import", str(path), *(["--name", name] if name is not None else [])]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main([*argv, "--library", str(relations.root.parent)])
        assert code in (0, 2) and "Traceback" not in err.getvalue()
        assert code == 0 or len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        new = {r.name for r in relations.list()} - {"leaning"}  # the one relation the fixture holds
        assert len(new) == (code == 0)
        info, error = (relations.get(new.pop()), None) if code == 0 else (None, code)
    else:
        info, error = one_line_or_result(lambda: relations.import_file(path, name=name))
    if error is not None:
        assert not (kind == "as exported" and name == "fresh"), "a relation as Troupe exports it was refused"
        event("refused")
        assert snapshot(relations.root) == before, "a refused import changed the relation library"
        return
    event("imported")
    try:
        assert_mergeable(info)
    finally:
        relations.delete(info.name)  # a valid file was taken in: put the library back as it was
    assert snapshot(relations.root) == before


# ------------------------------------------------------------------------------------------------ command lines
class StartedWork(Exception):
    """Raised in place of a benchmark, a dataset, a training or a server: the command line was valid."""


# every place where bench, references and ui would start long work (or load a model, or open a port)
WORK = ["evals.speed_bench.run_speed_bench", "evals.layout_bench.run_bench", "evals.subject_bench.run_subject_bench",
        "evals.reference_bench.run_reference_bench", "evals.relation_bench.run_relation_bench",
        "demo_world.reference_scenes.write_demo_dataset", "engines.reference_synthesis.synthesize_dataset",
        "engines.reference_training.train_adapter", "engines.models.load_model", "studio.ui.build_ui",
        "studio.ui.serve"]  # fmt: skip
COMMANDS = [["bench"], ["bench", "--speed"], ["bench", "--speed", "--random-arch", "sdxl"], ["references", "dataset"],
            ["references", "train"], ["ui"]]  # fmt: skip
CLI_OPTIONS = ["--quick", "--steps", "--cfg", "--parts", "--no-subjects", "--held-out", "--layouts", "--first-seed",
               "--modes", "--json", "--speed", "--random-arch", "--size", "--repeats", "--cases", "--register-presets",
               "--register-steps", "--references", "--reference-strength", "--image-guidance", "--out", "--objects",
               "--views", "--seed", "--classes", "--dataset", "--batch", "--learning-rate", "--rank", "--save-every",
               "--threads", "--host", "--port", "--outputs", "--share", "--vram", "--dtype", "--device",
               "--quantization", "--offload", "--reference-adapter", "--vae", "--embedding", "--compile", "--help"]  # fmt: skip
cli_tokens = (
    st.sampled_from(CLI_OPTIONS)
    | st.text(max_size=20).filter(lambda t: "\x00" not in t)
    | st.sampled_from(
        [
            "0",
            "-1",
            "1",
            "2",
            "65536",
            str(2**63),
            "1e999",
            "nan",
            "-inf",
            "layout,relations",
            "all",
            "vanilla,guided",
            "quick",
            "sd15",
            "demo",
            "cpu",
            "tpu:9",
            "cuda:99",
            "A100",
            "CPU",
            "/dev/null",
            "/etc/passwd",
            "x.safetensors",
            "/proc/self",
            "localhost",
            "::1",
        ]
    )  # fmt: skip
)

# an option and a value, mostly: far more of them pass argparse and reach the commands' own checks
values = cli_tokens | st.integers(-2, 70_000).map(str) | st.floats().map(str)
option_pairs = st.lists(st.tuples(st.sampled_from(CLI_OPTIONS[:-1]), values), max_size=4).map(
    lambda pairs: [token for pair in pairs for token in pair]
)

AT_LEAST_ONE = ("--steps", "--layouts", "--repeats", "--objects", "--batch", "--rank", "--save-every", "--threads")


def sane_numbers(argv: list[str]) -> bool:
    """The numbers of a command line (the last of each option, as argparse takes it) in the ranges they must be."""
    last = {option: value for option, value in zip(argv, argv[1:], strict=False) if option.startswith("--")}
    ok = all(int(last[o]) >= 1 for o in AT_LEAST_ONE if o in last)
    ok &= "--port" not in last or 1 <= int(last["--port"]) <= 65535
    ok &= "--size" not in last or 64 <= int(last["--size"]) <= 4096
    return ok and all(math.isfinite(float(last[o])) for o in ("--cfg", "--learning-rate") if o in last)


@pytest.fixture(scope="module")
def no_work(workspace):
    """The long work replaced by StartedWork, the default library the fuzzed one, the working folder a scratch one."""
    root = workspace[0]
    with pytest.MonkeyPatch.context() as patch:
        for target in WORK:
            patch.setattr(target, lambda *args, **kwargs: (_ for _ in ()).throw(StartedWork()))
        patch.setenv("TROUPE_LIBRARY", str(root / "lib"))
        (root / "cwd").mkdir(exist_ok=True)
        patch.chdir(root / "cwd")
        yield root


@FUZZ
@given(command=st.sampled_from(COMMANDS), argv=st.lists(cli_tokens, max_size=8) | option_pairs)
def test_bench_references_ui_command_lines(command, argv, no_work):
    root = no_work
    # a model that does not exist, wherever a model would load: a command that gets that far says so in one line
    model = ["--model", str(root / "no-model")] if command[0] != "ui" or argv[:1] == ["--vram"] else []
    full = [*command, *argv, *model]
    before, scratch = snapshot(root / "lib"), snapshot(root / "cwd")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(full)
        except SystemExit as exit_:  # argparse: a usage line and exit code 2 (or 0 for --help)
            code = exit_.code
        except StartedWork:
            code = "started"
    event(f"{command[0]}: {code}")
    assert code in (0, 1, 2, "started"), f"{full}: exit code {code}"
    assert "Traceback" not in err.getvalue(), f"{full}: {err.getvalue()}"
    if code == "started":  # what started had been checked: no long work begins on a number it cannot use
        assert sane_numbers(full), f"{full} started work with a number out of range"
    if code in (1, 2):
        assert snapshot(root / "lib") == before and snapshot(root / "cwd") == scratch, f"{full} failed and wrote"
