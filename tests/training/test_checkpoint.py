"""Checkpoint files: content, best-model selection, atomic writes, safe loading and clear errors."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn
from trainer_testkit import ScriptedValLoss, clone_state, linear_model, loader, make_trainer, mlp, regression_data

from mlff_distiller.training import (
    Callback,
    CheckpointError,
    ConfigError,
    load_checkpoint_file,
    load_model_weights,
    save_checkpoint,
)
from mlff_distiller.training.checkpoint import FORMAT_VERSION

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _assert_plain(value, path="state"):
    assert isinstance(value, PLAIN_TYPES), f"{path} is a {type(value).__name__}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int)), f"{path} has key {key!r}"
            _assert_plain(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _assert_plain(item, f"{path}[{i}]")


def _loaders():
    x, y = regression_data(n=32, seed=0)
    xv, yv = regression_data(n=16, seed=1)
    return loader(x, y), loader(xv, yv)


class WeightsAtEpoch(Callback):
    def __init__(self):
        self.weights = {}

    def on_train_epoch_end(self, trainer, metrics):
        self.weights[trainer.epoch] = clone_state(trainer.model)


def _fit_with_scripted_val(tmp_path, values, **config):
    train, val = _loaders()
    weights = WeightsAtEpoch()
    trainer = make_trainer(
        mlp(),
        train,
        val,
        loss_fn=ScriptedValLoss(values),
        max_epochs=len(values),
        checkpoint_dir=str(tmp_path / "ckpt"),
        callbacks=[weights],
        **config,
    )
    history = trainer.fit()
    return trainer, history, weights


def test_last_and_best_files_and_best_is_the_best_epoch(tmp_path):
    """After fit: last.pt holds the final epoch, best_model.pt the epoch with the lowest val/loss (epoch 2
    here), including that epoch's exact weights; no temp files are left behind."""
    trainer, _, weights = _fit_with_scripted_val(tmp_path, [1.0, 0.25, 0.5, 0.75])
    ckpt = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt)) == [".lock", "best_model.pt", "last.pt", "previous.pt"]
    assert torch.load(ckpt / "previous.pt", weights_only=True)["epoch"] == 3
    last = torch.load(ckpt / "last.pt", weights_only=True)
    best = torch.load(ckpt / "best_model.pt", weights_only=True)
    assert (last["epoch"], best["epoch"]) == (4, 2)
    assert best["best_metric"] == 0.25 and best["best_epoch"] == 2
    assert last["best_metric"] == 0.25 and last["best_epoch"] == 2
    for name, tensor in weights.weights[2].items():
        assert torch.equal(best["model"][name], tensor)
        assert torch.equal(last["model"][name], weights.weights[4][name])
    assert not torch.equal(best["model"]["0.weight"], last["model"]["0.weight"])


def test_best_model_follows_mode_max(tmp_path):
    """mode='max' keeps the epoch with the highest monitored value."""
    trainer, _, _ = _fit_with_scripted_val(tmp_path, [0.25, 0.75, 0.5], mode="max")
    assert torch.load(tmp_path / "ckpt" / "best_model.pt", weights_only=True)["epoch"] == 2


def test_checkpoint_content_is_plain_data(tmp_path):
    """A checkpoint loads with weights_only=True and holds the whole training state as plain data."""
    train, val = _loaders()
    trainer = make_trainer(
        mlp(),
        train,
        val,
        max_epochs=2,
        checkpoint_dir=str(tmp_path),
        optimizer="adam",
        lr_scheduler="cosine",
        early_stopping_patience=5,
        ema_decay=0.5,
    )
    trainer.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "global_step",
        "best_metric",
        "early_stopping",
        "rng",
        "config",
        "ema",
        "history",
        "callbacks",
        "format_version",
    ):
        assert key in state, key
    _assert_plain(state)
    assert state["format_version"] == FORMAT_VERSION
    assert (state["epoch"], state["global_step"]) == (2, 8)
    assert state["config"] == trainer.config.to_dict()
    assert state["optimizer_class"] == "Adam" and state["scheduler_class"] == "CosineAnnealingLR"
    assert state["scheduler"]["last_epoch"] == 2
    assert state["early_stopping"] == trainer.early_stopping
    assert state["best_metric"] == pytest.approx(min(trainer.history["val/loss"]))
    assert state["history"] == trainer.history
    # nothing draws random numbers after the last save: the stored RNG states are the current ones
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    version, internal, gauss = state["rng"]["python"]
    assert (version, tuple(internal), gauss) == random.getstate()
    assert state["rng"]["numpy"]["pos"] == np.random.get_state()[2]
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    assert int(state["optimizer"]["state"][0]["step"]) == 8


def test_save_is_atomic_and_failed_save_keeps_old_file(tmp_path):
    """save_checkpoint replaces the file in one step; a save that fails mid-way leaves the previous file
    intact and no temporary file behind."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format_version": 1, "value": torch.arange(3)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # pickling a local lambda fails
        save_checkpoint({"format_version": 1, "value": lambda: 0}, path)  # not serialisable
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint_file(path)["value"], torch.arange(3))


def test_fresh_fit_refuses_existing_checkpoints(tmp_path):
    """A fresh fit into a checkpoint_dir holding last.pt raises ConfigError (naming the files and the ways
    out), unless overwrite_checkpoints=True or the trainer was resumed with load_checkpoint."""
    train, val = _loaders()
    make_trainer(linear_model(), train, val, max_epochs=1, checkpoint_dir=str(tmp_path)).fit()
    before = (tmp_path / "last.pt").read_bytes()

    fresh = make_trainer(linear_model(), train, val, max_epochs=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"already holds \['last.pt', 'best_model.pt'\].*overwrite_checkpoints"):
        fresh.fit()
    assert (tmp_path / "last.pt").read_bytes() == before  # nothing was touched

    overwrite = make_trainer(
        linear_model(), train, val, max_epochs=2, checkpoint_dir=str(tmp_path), overwrite_checkpoints=True
    )
    overwrite.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2

    resumed = make_trainer(linear_model(), train, val, max_epochs=3, checkpoint_dir=str(tmp_path))
    resumed.load_checkpoint(tmp_path / "last.pt")
    resumed.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3


class TwoPart(nn.Module):
    def __init__(self, hidden, head_name):
        super().__init__()
        self.enc = nn.Linear(4, hidden)
        setattr(self, head_name, nn.Linear(hidden, 1))
        self.head_name = head_name

    def forward(self, x):
        return getattr(self, self.head_name)(torch.tanh(self.enc(x)))


def test_loading_into_other_architecture_lists_key_problems(tmp_path):
    """Loading into a different model raises CheckpointError listing missing, unexpected and mis-shaped keys."""
    train, val = _loaders()
    make_trainer(TwoPart(8, "head"), train, val, max_epochs=1, checkpoint_dir=str(tmp_path)).fit()
    other = make_trainer(TwoPart(16, "out"), train, val, max_epochs=1)
    with pytest.raises(CheckpointError) as info:
        other.load_checkpoint(tmp_path / "last.pt")
    message = str(info.value)
    assert "last.pt" in message
    assert "missing keys ['out.bias', 'out.weight']" in message
    assert "unexpected keys ['head.bias', 'head.weight']" in message
    assert "enc.bias: checkpoint (8,) vs model (16,)" in message
    assert "enc.weight: checkpoint (8, 4) vs model (16, 4)" in message
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model_weights(TwoPart(16, "out"), tmp_path / "last.pt")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign", "future", "missing"])
def test_unreadable_checkpoint_raises_checkpoint_error_naming_file(tmp_path, damage):
    """Truncated, garbage, empty, foreign, too-new or missing files raise CheckpointError naming the file."""
    train, val = _loaders()
    make_trainer(linear_model(), train, val, max_epochs=1, checkpoint_dir=str(tmp_path / "run")).fit()
    good = (tmp_path / "run" / "last.pt").read_bytes()
    path = tmp_path / f"{damage}.pt"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif damage == "future":
        torch.save({"format_version": FORMAT_VERSION + 1}, path)
    trainer = make_trainer(linear_model(), train, val, max_epochs=1)
    with pytest.raises(CheckpointError) as info:
        trainer.load_checkpoint(path)
    assert str(path) in str(info.value)


def test_pickled_objects_are_refused(tmp_path):
    """A file holding an arbitrary pickled object is not executed/accepted (weights_only loading)."""
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "obj": WeightsAtEpoch()}, path)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint_file(path)


def test_resume_with_changed_learning_rate(tmp_path, caplog):
    """A changed optimisation setting is refused (naming field and both values) unless strict_config=False,
    which warns; resumable fields such as max_epochs may change freely."""
    train, val = _loaders()
    make_trainer(linear_model(), train, val, max_epochs=1, checkpoint_dir=str(tmp_path), learning_rate=0.05).fit()
    changed = make_trainer(linear_model(), train, val, max_epochs=1, learning_rate=0.01)
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.05, now 0.01.*strict_config=False"):
        changed.load_checkpoint(tmp_path / "last.pt")
    assert changed.epoch == 0 and changed.resumed_from is None  # nothing was restored

    with caplog.at_level("WARNING", logger="mlff_distiller.training.trainer"):
        changed.load_checkpoint(tmp_path / "last.pt", strict_config=False)
    assert changed.epoch == 1
    assert "learning_rate: checkpoint 0.05, now 0.01" in caplog.text

    longer = make_trainer(linear_model(), train, val, max_epochs=5, learning_rate=0.05, val_interval=2)
    longer.load_checkpoint(tmp_path / "last.pt")
    assert longer.epoch == 1


def test_resume_refuses_other_optimizer_or_scheduler(tmp_path):
    """Checkpoint optimizer/scheduler classes must match the Trainer's (even with strict_config=False)."""
    train, val = _loaders()
    make_trainer(linear_model(), train, val, max_epochs=1, checkpoint_dir=str(tmp_path), optimizer="adam").fit()
    sgd = make_trainer(linear_model(), train, val, max_epochs=1, optimizer="sgd")
    with pytest.raises(CheckpointError, match="holds a Adam state but the Trainer uses SGD"):
        sgd.load_checkpoint(tmp_path / "last.pt", strict_config=False)
    cosine = make_trainer(linear_model(), train, val, max_epochs=1, optimizer="adam", lr_scheduler="cosine")
    with pytest.raises(CheckpointError, match="holds scheduler None but the Trainer uses CosineAnnealingLR"):
        cosine.load_checkpoint(tmp_path / "last.pt", strict_config=False)


def test_load_model_weights_for_inference(tmp_path):
    """load_model_weights(model, path, use_ema=False) restores exactly the trained weights."""
    train, val = _loaders()
    trained = mlp()
    make_trainer(trained, train, val, max_epochs=2, checkpoint_dir=str(tmp_path)).fit()
    fresh = mlp(seed=99)
    assert load_model_weights(fresh, tmp_path / "last.pt", use_ema=False) is fresh
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_checkpoint_reads_only_the_weights(tmp_path):
    """evaluate_checkpoint(best_model.pt) gives the metrics of that checkpoint's EMA weights, even from a trainer
    whose config could not resume it (another learning rate), and leaves that trainer's weights and state alone."""
    train, val = _loaders()
    make_trainer(mlp(), train, val, max_epochs=3, checkpoint_dir=str(tmp_path), ema_decay=0.5).fit()
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    reference = load_model_weights(mlp(seed=5), tmp_path / "best_model.pt")  # EMA weights
    x, y = regression_data(n=16, seed=1)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(reference(x), y).item()

    other = make_trainer(mlp(seed=3), train, val, max_epochs=3, learning_rate=0.5, ema_decay=0.5)
    own = clone_state(other.model)
    metrics = other.evaluate_checkpoint(tmp_path / "best_model.pt", val, prefix="test")
    assert metrics == {"test/loss": pytest.approx(expected, rel=1e-6)}
    assert best["ema"] and not torch.equal(best["ema"]["shadow"]["0.weight"], best["model"]["0.weight"])
    assert (other.epoch, other.global_step, other.best_metric) == (0, 0, None)
    for name, tensor in other.model.state_dict().items():
        assert torch.equal(tensor, own[name]), name
