"""engines/checkpoint.py: a resumed run continues exactly; another run's or a half-written checkpoint is ignored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engines.checkpoint import META, TENSORS, Checkpoint, TrainingState


def make_run(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    return TrainingState({"model": model}, optimizer, {"draws": torch.Generator().manual_seed(seed)})


def train(state: TrainingState, steps: int) -> None:
    model, generator = state.modules["model"], state.generators["draws"]
    for _ in range(steps):
        x = torch.randn(5, 4, generator=generator)  # (5, 4)
        loss = model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()


def weights(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.modules["model"].state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    run = make_run(0)
    train(run, 3)
    Checkpoint(tmp_path / "ckpt", "run-a").save(run, 3, {"curve": [0.5, 0.25], "elapsed": 1.5})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {TENSORS, META}  # safetensors + JSON, no pickle

    resumed = make_run(1)  # other weights, moments and RNG until restored
    restored = Checkpoint(tmp_path / "ckpt", "run-a").load(resumed)
    assert restored is not None and restored.step == 3
    assert restored.extra == {"curve": [0.5, 0.25], "elapsed": 1.5}
    assert_same(weights(resumed), weights(run))
    for p, q in zip(run.modules["model"].parameters(), resumed.modules["model"].parameters()):
        moments, loaded = run.optimizer.state[p], resumed.optimizer.state[q]
        assert moments.keys() == loaded.keys() and all(torch.equal(moments[k], loaded[k]) for k in moments)
    assert torch.equal(resumed.generators["draws"].get_state(), run.generators["draws"].get_state())
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]

    train(run, 4)
    train(resumed, 4)
    assert_same(weights(resumed), weights(run))  # the resumed run continues as if never stopped


def test_another_key_is_ignored_and_changes_nothing(tmp_path):
    run = make_run(0)
    train(run, 2)
    Checkpoint(tmp_path, "request-1").save(run, 2)
    other = make_run(1)
    before = weights(other)
    assert Checkpoint(tmp_path, "request-2").load(other) is None
    assert_same(weights(other), before)


@pytest.mark.parametrize("damage", ["split pair", "truncated tensors", "truncated json", "missing json", "empty"])
def test_half_written_checkpoint_is_ignored(tmp_path, damage):
    folder = tmp_path / "ckpt"
    run = make_run(0)
    checkpoint = Checkpoint(folder, "key")
    checkpoint.save(run, 1)
    if damage == "split pair":  # a crash between the two moves of a later save: new tensors beside old JSON
        old_meta = (folder / META).read_text()
        train(run, 1)
        checkpoint.save(run, 2)
        (folder / META).write_text(old_meta)
    elif damage == "truncated tensors":
        data = (folder / TENSORS).read_bytes()
        (folder / TENSORS).write_bytes(data[: len(data) // 2])
    elif damage == "truncated json":
        text = (folder / META).read_text()
        (folder / META).write_text(text[: len(text) // 2])
    elif damage == "missing json":
        (folder / META).unlink()
    else:
        shutil.rmtree(folder)
    other = make_run(1)
    before = weights(other)
    assert checkpoint.load(other) is None
    assert_same(weights(other), before)


def test_a_save_replaces_the_previous_one(tmp_path):
    run = make_run(0)
    checkpoint = Checkpoint(tmp_path, "key")
    checkpoint.save(run, 1)
    train(run, 2)
    checkpoint.save(run, 3)
    assert json.loads((tmp_path / META).read_text())["step"] == 3
    assert not list(tmp_path.glob("*.part"))
    resumed = make_run(1)
    assert checkpoint.load(resumed).step == 3
    assert_same(weights(resumed), weights(run))


def test_part_names_cannot_collide():
    with pytest.raises(ValueError):
        TrainingState({"rng": torch.nn.Linear(1, 1)}, torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))


def test_grad_scaler_state_is_restored(tmp_path):
    """The fp16 path of registration keeps a GradScaler; its scale must survive a resume."""
    run = make_run(0)
    saved = TrainingState(run.modules, run.optimizer, run.generators, torch.amp.GradScaler("cpu", init_scale=512.0))
    Checkpoint(tmp_path, "key").save(saved, 1)
    other = make_run(0)
    resumed = TrainingState(other.modules, other.optimizer, other.generators, torch.amp.GradScaler("cpu"))
    assert Checkpoint(tmp_path, "key").load(resumed) is not None
    assert resumed.grad_scaler.get_scale() == 512.0
