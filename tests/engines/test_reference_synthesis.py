"""SynCD's dataset recipe on SD models (engines/reference_synthesis.py) on the tiny SD 1.5: a dataset load_dataset
reads, binary masks, views coupled by shared attention, resuming, skipping, refusing bad input; the masks' maths."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import engines.reference_synthesis as synthesis
from engines.foreground_masks import foreground_masks, mask_problem, otsu_threshold
from engines.reference_dataset import load_dataset
from engines.reference_synthesis import (
    BACKGROUNDS,
    PROGRESS_FILE,
    SynthesisSettings,
    class_positions,
    generate_views,
    read_class_file,
    synthesize_dataset,
)
from engines.types import Cancelled, InputError

QUICK = SynthesisSettings(objects=2, views=2, steps=2, size=64, classes=("dog", "teddy bear"))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def written(sd15, tmp_path_factory) -> tuple[Path, list]:
    """One uninterrupted run of two objects: the folder and the progress reports."""
    folder, reports = tmp_path_factory.mktemp("synthesis") / "dataset", []
    assert synthesize_dataset(sd15, folder, QUICK, reports.append) == 2
    return folder, reports


def test_writes_a_dataset_load_dataset_reads(written, tiny_sd15_dir):
    folder, reports = written
    dataset = load_dataset(folder)
    assert (dataset.source, dataset.size, len(dataset.objects)) == (str(tiny_sd15_dir), 64, 2)
    assert [o.class_word for o in dataset.objects] == ["dog", "teddy bear"]
    for index, item in enumerate(dataset.objects):
        assert len(item.images) == len(item.masks) == len(item.captions) == 2
        assert len(set(item.captions)) == 2 and all(f" {item.class_word} " in c for c in item.captions)
        for view in range(2):
            image, mask = dataset.image(index, view)
            assert image.size == mask.size == (64, 64)
            values = set(np.unique(pixels(mask)).tolist())
            assert values <= {0, 255} and 255 in values  # binary, and not empty
    assert [r.note for r in reports if r.note] == ["wrote dog", "wrote teddy bear"]
    steps = [r.step for r in reports if r.step]
    assert steps == [1, 2, 1, 2] and reports[-1].written == 2 and reports[-1].skipped == 0


def test_shared_attention_couples_the_views(sd15):
    backgrounds, seeds, settings = BACKGROUNDS[:2], (5, 6), replace(QUICK, views=2)
    shared = generate_views(sd15, "dog", backgrounds, seeds, settings)
    apart = generate_views(sd15, "dog", backgrounds, seeds, replace(settings, shared=False))
    alone = generate_views(sd15, "dog", backgrounds[:1], seeds[:1], settings)
    assert np.array_equal(pixels(apart.images[0]), pixels(alone.images[0]))  # off: each view as if alone
    for view in range(2):
        difference = np.abs(pixels(shared.images[view]) - pixels(apart.images[view]))
        assert difference.mean() > 0.1  # on: every view is changed by the other
    restored = {type(p).__name__ for p in sd15.pipe.unet.attn_processors.values()}
    assert not restored & {"SharedSelfAttnProcessor", "ClassAttentionRecorder"}  # the UNet is as it was


def test_sdxl_views_too(sdxl):
    views = generate_views(sdxl, "dog", BACKGROUNDS[:2], (5, 6), replace(QUICK, steps=1))
    assert [image.size for image in views.images] == [(64, 64)] * 2
    assert all(set(np.unique(pixels(mask)).tolist()) <= {0, 255} for mask in views.masks)


def test_a_resumed_run_does_not_redo_finished_objects(sd15, written, tmp_path, monkeypatch):
    folder, cancel = tmp_path / "dataset", threading.Event()

    def stop_after_first(progress) -> None:
        if progress.note:
            cancel.set()

    with pytest.raises(Cancelled):
        synthesize_dataset(sd15, folder, QUICK, stop_after_first, cancel)
    assert len(load_dataset(folder).objects) == 1
    first = pixels(load_dataset(folder).image(0, 0)[0])
    # as if the run had stopped between writing the object and writing the ledger: it still counts as tried
    ledger = json.loads((folder / PROGRESS_FILE).read_text())
    (folder / PROGRESS_FILE).write_text(json.dumps({**ledger, "attempts": 0, "written": 0}))

    calls, real = [], synthesis.generate_views

    def counted(bundle, word, *args, **kwargs):
        calls.append(word)
        return real(bundle, word, *args, **kwargs)

    monkeypatch.setattr(synthesis, "generate_views", counted)
    assert synthesize_dataset(sd15, folder, QUICK) == 2
    assert calls == ["teddy bear"]
    resumed, whole = load_dataset(folder), load_dataset(written[0])
    assert np.array_equal(pixels(resumed.image(0, 0)[0]), first)
    for view in range(2):  # what one uninterrupted run wrote
        for got, want in zip(resumed.image(1, view), whole.image(1, view)):
            assert np.array_equal(pixels(got), pixels(want))
    assert synthesize_dataset(sd15, folder, QUICK) == 2 and calls == ["teddy bear"]  # done: nothing to do


def test_objects_with_bad_masks_are_skipped_and_said(sd15, tmp_path, monkeypatch):
    monkeypatch.setattr(synthesis, "MAX_SKIPS_IN_A_ROW", 2)
    reports, folder = [], tmp_path / "dataset"
    settings = replace(QUICK, steps=1, max_coverage=0.0)  # every non-empty mask is too big
    with pytest.raises(InputError, match="last 2 objects were all skipped"):
        synthesize_dataset(sd15, folder, settings, reports.append)
    notes = [r.note for r in reports if r.note]
    assert len(notes) == 2 and all(n.startswith("skipped ") and "covers" in n for n in notes)
    assert reports[-1].skipped == 2 and reports[-1].written == 0
    assert json.loads((folder / PROGRESS_FILE).read_text())["attempts"] == 2
    with pytest.raises(InputError, match="is not a reference dataset"):
        load_dataset(folder)  # nothing written


@pytest.mark.parametrize(
    "change, message",
    [
        ({"views": 0}, "at least 2 views"),
        ({"views": 1}, "at least 2 views"),
        ({"classes": ()}, "class list is empty"),
        ({"classes": ("dog", " ")}, "empty class word"),
        ({"size": 50}, "multiple of 8"),
        ({"objects": 0}, "at least 1 object"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(sd15, tmp_path, change, message):
    folder = tmp_path / "dataset"
    with pytest.raises(InputError, match=message):
        synthesize_dataset(sd15, folder, replace(QUICK, **change))
    assert not folder.exists()


def test_continuing_with_another_recipe_is_refused(sd15, written):
    folder, _ = written
    before = (folder / PROGRESS_FILE).read_text()
    with pytest.raises(InputError, match="steps"):
        synthesize_dataset(sd15, folder, replace(QUICK, objects=3, steps=3))
    assert (folder / PROGRESS_FILE).read_text() == before


def test_class_files_and_positions(sd15, tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# pets\ndog\n\n  teddy   bear  # a toy\n")
    assert read_class_file(path) == ("dog", "teddy bear")
    path.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no class words"):
        read_class_file(path)
    with pytest.raises(InputError, match="does not exist"):
        read_class_file(tmp_path / "missing.txt")
    tokenizer = sd15.pipe.tokenizer
    positions = class_positions(tokenizer, "teddy bear")
    ids = tokenizer(synthesis.caption("teddy bear", "on a wooden table")).input_ids
    assert tokenizer.decode([ids[p] for p in positions]).replace(" ", "") == "teddybear"


def test_otsu_splits_two_modes_and_masks_are_dilated():
    values = torch.cat([torch.full((90,), 0.1), torch.full((10,), 0.8)]) + torch.linspace(0, 0.01, 100)
    assert 0.1091 < otsu_threshold(values) < 0.8  # above the low mode, below the high one
    assert otsu_threshold(torch.ones(5)) == 1.0  # nothing to split
    maps = torch.zeros(1, 8, 8)
    maps[0, 4, 4] = 1.0
    mask = foreground_masks(maps, (8, 8))[0]  # one hot cell, grown by the 3×3 dilation
    assert mask.sum() == 9 and bool(mask[3:6, 3:6].all())
    assert mask_problem(torch.zeros(2, 8, 8, dtype=torch.bool), 0.9) == "view 0's mask is empty"
    full = torch.ones(2, 8, 8, dtype=torch.bool)
    assert "covers 100%" in mask_problem(full, 0.9) and mask_problem(mask[None], 0.9) is None


def test_cli_writes_a_dataset_with_an_sd_model(tiny_sd15_dir, tmp_path, capsys):
    from studio.__main__ import main

    classes = tmp_path / "classes.txt"
    classes.write_text("mug\n")
    args = ["references", "dataset", "--model", str(tiny_sd15_dir), "--out", str(tmp_path / "dataset"),
            "--objects", "1", "--views", "2", "--steps", "1", "--size", "64", "--classes", str(classes)]  # fmt: skip
    assert main(args) == 0
    assert [o.class_word for o in load_dataset(tmp_path / "dataset").objects] == ["mug"]
    assert "1 objects, 2 views each" in capsys.readouterr().out
    assert main([*args[:-2], "--classes", str(tmp_path / "missing.txt")]) == 2
