"""Cones 2 registration on tiny random SD 1.5 / SDXL pipelines: loss, preservation, Δ, cancel, kill, resume."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from engines.library import SubjectLibrary
from engines.models import ModelBundle, text_encoder_fingerprint
from engines.register import (
    PRESETS,
    class_token_ids,
    load_sentence_templates,
    register_subject,
    sentence_bank,
    split_bank,
)
from engines.types import Cancelled, InputError, ModelSpec, RegisterRequest
from tests.tiny_models import tiny_sd15, tiny_sdxl

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
# Short runs on the tiny models: a high lr because the random tiny weights are small (init std 0.02)
FAST = dict(
    steps=40, lr=2e-4, reg_weight=10.0, batch=2, reg_batch=4, reg_pool=64, delta_sentences=200, checkpoint_every=0
)
PRESERVATION_TOLERANCE = 0.08  # relative ‖E^custom − E‖ / ‖E‖ at non-class tokens of held-out sentences


def bundle(kind="sd15") -> ModelBundle:
    pipe = tiny_sd15() if kind == "sd15" else tiny_sdxl()
    return ModelBundle(
        pipe, ModelSpec("tiny"), kind, torch.device("cpu"), torch.float32, text_encoder_fingerprint(pipe)
    )


@pytest.fixture(scope="module")
def sd15():
    return bundle("sd15")


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory) -> tuple[str, ...]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(3):
        image = Image.new("RGB", (96, 80), (40, 140, 40))
        ImageDraw.Draw(image).ellipse((20 + 5 * i, 15, 70 + 5 * i, 65), fill=(200, 30, 30))
        image.save(folder / f"p{i}.png")
        paths.append(str(folder / f"p{i}.png"))
    return tuple(paths)


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the library but the resumable work area, by content."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".work" not in p.relative_to(root).parts
    }


def seeded_library(tmp_path: Path, sd15, photo_paths) -> SubjectLibrary:
    library = SubjectLibrary(tmp_path / "lib")
    request = RegisterRequest("ada", "cat", photo_paths[:1], preset="quick")
    register_subject(sd15, request, library, overrides={**FAST, "steps": 2, "delta_sentences": 16})
    return library


# ------------------------------------------------------------------------------------------ sentence bank
@pytest.mark.parametrize("word", ["dog", "teddy bear", "apple"])
def test_sentence_bank_is_large_varied_and_deterministic(word):
    bank = sentence_bank(word, 1000)
    assert len(bank) == len(set(bank)) == 1000 and bank == sentence_bank(word, 1000)
    assert all(f" {word} " in f" {s} " for s in bank)
    assert all(s.count(word) == 1 for s in bank)
    assert any("watercolor" in s for s in bank) and any("next to" in s for s in bank)
    if word == "apple":
        assert "an apple" in bank
    train, heldout = split_bank(bank)
    assert len(heldout) == 100 and not set(train) & set(heldout)


def test_sentence_templates_are_validated(tmp_path):
    import json

    data = load_sentence_templates()
    for broken, message in [
        ({**data, "colour": ["x"]}, "unknown"),
        ({**data, "frames": ["no class here"]}, "{cls}"),
        ({**data, "frames": ["{a} {cls} {weather}"]}, "unknown slots"),
    ]:
        path = tmp_path / "t.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(InputError, match=message):
            load_sentence_templates(path)


def test_presets_document_their_reasoning():
    assert set(PRESETS) == {"instant", "quick", "standard", "thorough"}
    assert all(p.why for p in PRESETS.values()) and PRESETS["instant"].steps == 0  # instant trains nothing
    assert PRESETS["quick"].steps < PRESETS["standard"].steps < PRESETS["thorough"].steps


def test_presets_are_the_one_table_of_engines_types():
    from engines.types import REGISTER_PRESETS

    assert PRESETS is REGISTER_PRESETS  # the UI, the CLI and registration read the same dict


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_encoder_output_is_exactly_what_the_pipeline_feeds_the_unet(kind):
    from engines.register import unet_condition

    tiny = bundle(kind)
    prompt = "a photo of dog on the beach"
    ids = [
        t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
        for t in tiny.tokenizers
    ]
    with torch.no_grad():
        ours = unet_condition(tiny.text_encoders, ids, tiny.is_xl)  # (1, 77, ΣD)
        if tiny.is_xl:
            theirs = tiny.pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
        else:
            theirs = tiny.pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert ours.shape == theirs.shape == (1, 77, sum(e.config.hidden_size for e in tiny.text_encoders))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_register_sd15_loss_falls_preserves_other_tokens(tmp_path, sd15, photo_paths):
    library = SubjectLibrary(tmp_path / "lib")
    progress = []
    before = [p.detach().clone() for p in sd15.pipe.text_encoder.parameters()]
    unet_flags = [p.requires_grad for p in sd15.pipe.unet.parameters()]
    info = register_subject(
        sd15,
        RegisterRequest("rex", "dog", photo_paths, preset="quick"),
        library,
        on_progress=progress.append,
        overrides=FAST,
    )
    stats = library.meta("rex")["stats"]
    # L_sub on a fixed set of (latent, t, ε) falls (Eq. 2)
    assert stats["l_sub_eval_after"] < stats["l_sub_eval_before"]
    assert library.get("rex").photo_loss == (stats["l_sub_eval_before"], stats["l_sub_eval_after"])  # UI shows it
    # non-class outputs of held-out sentences stay near the frozen encoder's (Eq. 3)
    assert stats["heldout_preservation_error"] < PRESERVATION_TOLERANCE
    residuals = library.residuals("rex")
    assert set(residuals) == {"text_encoder"} and residuals["text_encoder"].shape == (1, 32)
    assert residuals["text_encoder"].dtype == torch.float32 and residuals["text_encoder"].norm() > 0
    assert [p.step for p in progress] == list(range(1, 41)) and all(p.total == 40 for p in progress)
    assert all(p.loss is not None for p in progress) and len(info.loss_curve) == 40
    assert all(torch.equal(a, b) for a, b in zip(before, sd15.pipe.text_encoder.parameters()))  # E untouched
    assert [p.requires_grad for p in sd15.pipe.unet.parameters()] == unet_flags  # UNet restored as it was
    assert not (library.root / ".work" / "rex").exists()
    # without L_reg the same run drifts much further on held-out sentences
    register_subject(
        sd15,
        RegisterRequest("rex0", "dog", photo_paths, preset="quick"),
        library,
        overrides={**FAST, "reg_weight": 0.0},
    )
    drift = library.meta("rex0")["stats"]["heldout_preservation_error"]
    assert drift > 3 * stats["heldout_preservation_error"]


def test_register_sdxl_has_a_residual_per_encoder(tmp_path, photo_paths):
    xl = bundle("sdxl")
    library = SubjectLibrary(tmp_path / "lib")
    register_subject(
        xl,
        RegisterRequest("rex", "dog", photo_paths[:2], preset="quick"),
        library,
        overrides={**FAST, "steps": 6, "gradient_checkpointing": True},
    )
    assert library.meta("rex")["stats"]["gradient_checkpointing"] and not xl.pipe.unet.is_gradient_checkpointing
    residuals = library.residuals("rex")
    widths = [e.config.hidden_size for e in xl.text_encoders]
    assert {k: tuple(v.shape) for k, v in residuals.items()} == {
        "text_encoder": (1, widths[0]),
        "text_encoder_2": (1, widths[1]),
    }
    assert library.get("rex").family == "sdxl"


def test_multi_token_class_word_and_v_prediction(tmp_path, photo_paths):
    tiny = bundle("sd15")
    tiny.pipe.scheduler = type(tiny.pipe.scheduler).from_config(
        tiny.pipe.scheduler.config, prediction_type="v_prediction"
    )
    library = SubjectLibrary(tmp_path / "lib")
    register_subject(
        tiny,
        RegisterRequest("teddy", "teddy bear", photo_paths[:1], preset="quick", use_masks=False),
        library,
        overrides={**FAST, "steps": 3},
    )
    n = len(class_token_ids(tiny.tokenizers[0], "teddy bear"))
    assert n > 1 and library.residuals("teddy")["text_encoder"].shape == (n, 32)
    assert library.meta("teddy")["stats"]["prediction_type"] == "v_prediction"


def test_existing_name_is_refused_before_training(tmp_path, sd15, photo_paths):
    library = seeded_library(tmp_path, sd15, photo_paths)
    with pytest.raises(InputError, match="already exists"):
        register_subject(
            sd15,
            RegisterRequest("ada", "cat", photo_paths, preset="quick"),
            library,
            on_progress=lambda p: pytest.fail("trained anyway"),
        )


# ------------------------------------------------------------------------------------------ cancel / resume / kill
def test_cancel_leaves_library_untouched_and_resume_matches(tmp_path, sd15, photo_paths):
    library = seeded_library(tmp_path, sd15, photo_paths)
    before = snapshot(library.root)
    cancel = threading.Event()
    request = RegisterRequest("rex", "dog", photo_paths, preset="quick", seed=3)
    settings = {**FAST, "steps": 8}

    def stop_after_three(progress):
        if progress.step == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        register_subject(sd15, request, library, on_progress=stop_after_three, cancel=cancel, overrides=settings)
    assert snapshot(library.root) == before
    assert (library.root / ".work" / "rex" / "state.json").is_file()
    steps = []
    register_subject(sd15, request, library, on_progress=lambda p: steps.append(p.step), overrides=settings)
    assert steps == [4, 5, 6, 7, 8]  # resumed after the third step
    assert not (library.root / ".work" / "rex").exists()
    # the same run without interruption gives the same Δ (weights, optimizer and RNG all restored)
    other = SubjectLibrary(tmp_path / "other")
    register_subject(sd15, request, other, overrides=settings)
    torch.testing.assert_close(
        library.residuals("rex")["text_encoder"], other.residuals("rex")["text_encoder"], rtol=1e-5, atol=1e-6
    )
    # a changed request does not resume someone else's checkpoint
    with pytest.raises(Cancelled):
        register_subject(
            sd15,
            RegisterRequest("bo", "dog", photo_paths, preset="quick", seed=3),
            library,
            on_progress=stop_after_three,
            cancel=(cancel := threading.Event()),
            overrides=settings,
        )
    steps.clear()
    register_subject(
        sd15,
        RegisterRequest("bo", "dog", photo_paths, preset="quick", seed=4),
        library,
        on_progress=lambda p: steps.append(p.step),
        overrides=settings,
    )
    assert steps[0] == 1


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from engines.library import SubjectLibrary
    from engines.models import ModelBundle, text_encoder_fingerprint
    from engines.register import register_subject
    from engines.types import ModelSpec, RegisterRequest
    from tests.tiny_models import tiny_sd15
    pipe = tiny_sd15()
    bundle = ModelBundle(pipe, ModelSpec("tiny"), "sd15", torch.device("cpu"), torch.float32,
                         text_encoder_fingerprint(pipe))
    request = RegisterRequest("rex", "dog", {photos!r}, preset="quick")
    def report(p):
        print("step", p.step, flush=True)
    register_subject(bundle, request, SubjectLibrary({root_lib!r}), on_progress=report, overrides={overrides!r})
""")
KILL_OVERRIDES = dict(steps=100000, lr=2e-4, reg_pool=32, delta_sentences=32, checkpoint_every=2)


def test_sigkill_mid_training_leaves_library_byte_identical(tmp_path, sd15, photo_paths):
    library = seeded_library(tmp_path, sd15, photo_paths)
    before = snapshot(library.root)
    script = KILL_SCRIPT.format(
        root=str(ROOT), photos=photo_paths, root_lib=str(library.root), overrides=KILL_OVERRIDES
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:
            if line.startswith("step") and int(line.split()[1]) >= 5:
                break
            assert time.monotonic() < deadline, "the training subprocess never got going"
        assert process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert snapshot(library.root) == before
    assert [s.name for s in library.list()] == ["ada"]
    assert (library.root / ".work" / "rex" / "state.json").is_file()  # a resumable checkpoint, nothing else
    # and the same request picks up from it
    cancel, first = threading.Event(), []
    with pytest.raises(Cancelled):
        register_subject(
            sd15,
            RegisterRequest("rex", "dog", photo_paths, preset="quick"),
            library,
            on_progress=lambda p: (first.append(p.step), cancel.set()),
            cancel=cancel,
            overrides=KILL_OVERRIDES,
        )
    assert first[0] >= 5 and first[0] % 2 == 1  # resumed after an even checkpoint, at least the fourth step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_register_on_cuda_half_precision_cancel_and_resume(tmp_path, photo_paths, kind):
    """The CUDA path: fp16 UNet, autocast with fp32 master weights, GradScaler, (8-bit) AdamW, CUDA RNG resume."""
    tiny = bundle(kind)
    tiny.pipe.to("cuda", torch.float16)
    tiny = ModelBundle(tiny.pipe, tiny.spec, kind, torch.device("cuda"), torch.float16, tiny.fingerprint)
    library = SubjectLibrary(tmp_path / "lib")
    request = RegisterRequest("rex", "dog", photo_paths, preset="quick")
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        register_subject(
            tiny,
            request,
            library,
            cancel=cancel,
            overrides={**FAST, "steps": 12},
            on_progress=lambda p: p.step == 5 and cancel.set(),
        )
    steps = []
    register_subject(
        tiny, request, library, on_progress=lambda p: steps.append(p.step), overrides={**FAST, "steps": 12}
    )
    assert steps[0] == 6
    stats = library.meta("rex")["stats"]
    assert stats["heldout_preservation_error"] < 0.2
    for value in library.residuals("rex").values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all() and value.norm() > 0
