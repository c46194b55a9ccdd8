"""Callback hooks: order, counts, checkpoint entries and state that survives a resume."""

from __future__ import annotations

import pytest
import torch
from trainer_testkit import ScriptedValLoss, linear_model, loader, make_trainer, regression_data

from mlff_distiller.training import Callback


class HookRecorder(Callback):
    """Appends (hook, epoch, global_step) for every hook call; counts steps as its resumable state."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self.steps_seen = 0

    def _note(self, name, trainer):
        self.calls.append((name, trainer.epoch, trainer.global_step))

    def on_fit_start(self, trainer):
        self._note("fit_start", trainer)

    def on_train_epoch_start(self, trainer):
        self._note("epoch_start", trainer)

    def on_train_batch_end(self, trainer, batch_index, terms):
        assert set(terms) == {"loss"} and terms["loss"].dtype == torch.float32
        self._note("batch_end", trainer)

    def on_optimizer_step(self, trainer):
        self.steps_seen += 1
        self._note("optimizer_step", trainer)

    def on_validation_end(self, trainer, metrics):
        assert set(metrics) == {"val/loss"}
        self._note("validation_end", trainer)

    def on_train_epoch_end(self, trainer, metrics):
        metrics["custom/seen"] = float(self.steps_seen)  # callbacks may add metrics
        self._note("epoch_end", trainer)

    def on_save_checkpoint(self, trainer, checkpoint):
        checkpoint["recorder"] = {"saved_at_step": trainer.global_step, "tag": "hello"}
        self._note("save_checkpoint", trainer)

    def on_load_checkpoint(self, trainer, checkpoint):
        self._note("load_checkpoint", trainer)

    def on_fit_end(self, trainer):
        self._note("fit_end", trainer)

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


def _loaders():
    x, y = regression_data(n=16, seed=0)  # 2 batches of 8
    return loader(x, y), loader(x, y)


def test_hook_order_and_counts(tmp_path):
    """fit_start once; per epoch: epoch_start, (batch_end, optimizer_step) per batch, validation_end,
    epoch_end, then one checkpoint save (last.pt; best_model.pt is linked to it); fit_end once."""
    recorder = HookRecorder()
    train, val = _loaders()
    trainer = make_trainer(
        linear_model(),
        train,
        val,
        max_epochs=2,
        checkpoint_dir=str(tmp_path),
        loss_fn=ScriptedValLoss([1.0, 2.0]),
        callbacks=[recorder],
    )
    history = trainer.fit()
    assert [(name, epoch, step) for name, epoch, step in recorder.calls] == [
        ("fit_start", 0, 0),
        ("epoch_start", 0, 0),
        ("batch_end", 0, 0),
        ("optimizer_step", 0, 1),
        ("batch_end", 0, 1),
        ("optimizer_step", 0, 2),
        ("validation_end", 0, 2),
        ("epoch_end", 1, 2),
        ("save_checkpoint", 1, 2),  # last.pt; best_model.pt (epoch 1 improved) is a link to it
        ("epoch_start", 1, 2),
        ("batch_end", 1, 2),
        ("optimizer_step", 1, 3),
        ("batch_end", 1, 3),
        ("optimizer_step", 1, 4),
        ("validation_end", 1, 4),
        ("epoch_end", 2, 4),
        ("save_checkpoint", 2, 4),  # last.pt only: 2.0 is worse than 1.0
        ("fit_end", 2, 4),
    ]
    assert history["custom/seen"] == [2.0, 4.0]


def test_on_fit_end_runs_when_training_fails():
    """on_fit_end is called even when fit() raises."""
    recorder = HookRecorder()
    train, _ = _loaders()

    def broken(model, batch):
        raise ValueError("broken loss")

    with pytest.raises(ValueError, match="broken loss"):
        make_trainer(linear_model(), train, loss_fn=broken, callbacks=[recorder]).fit()
    assert [name for name, _, _ in recorder.calls] == ["fit_start", "epoch_start", "fit_end"]


def test_checkpoint_entries_and_callback_state_round_trip(tmp_path):
    """on_save_checkpoint entries land in the file; the callback's state_dict is saved under its name and
    restored into a fresh callback of the same name by load_checkpoint (which also fires on_load_checkpoint)."""
    recorder = HookRecorder()
    train, val = _loaders()
    make_trainer(linear_model(), train, val, max_epochs=3, checkpoint_dir=str(tmp_path), callbacks=[recorder]).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["recorder"] == {"saved_at_step": 6, "tag": "hello"}
    assert state["callbacks"]["HookRecorder"] == {"steps_seen": 6}

    fresh = HookRecorder()
    resumed = make_trainer(linear_model(), train, val, max_epochs=4, checkpoint_dir=str(tmp_path), callbacks=[fresh])
    resumed.load_checkpoint(tmp_path / "last.pt")
    assert fresh.steps_seen == 6
    assert fresh.calls == [("load_checkpoint", 3, 6)]
    resumed.fit()
    assert fresh.steps_seen == 8
    assert torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]["HookRecorder"] == {"steps_seen": 8}


def test_callbacks_by_name_and_duplicate_classes(tmp_path):
    """Callbacks in a dict keep their names; two of one class in a list get distinct names, so each one's
    state is stored separately."""
    first, second = HookRecorder(), HookRecorder()
    train, val = _loaders()
    trainer = make_trainer(linear_model(), train, val, max_epochs=1, callbacks=[first, second])
    assert list(trainer.callbacks)[:2] == ["HookRecorder", "HookRecorder_2"]
    named = make_trainer(
        linear_model(), train, val, max_epochs=1, checkpoint_dir=str(tmp_path), callbacks={"mine": first}
    )
    first.steps_seen = 40
    named.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]["mine"] == {"steps_seen": 42}


def test_loss_fn_that_is_a_callback_gets_hooks_and_checkpointed_state(tmp_path):
    """A loss_fn object that is also a Callback (e.g. a distillation schedule) receives the hooks and its
    state is stored under 'loss_fn'."""

    class ScheduledLoss(Callback):
        def __init__(self):
            self.weight = 1.0

        def __call__(self, model, batch):
            x, y = batch
            return self.weight * torch.nn.functional.mse_loss(model(x), y)

        def on_train_epoch_end(self, trainer, metrics):
            self.weight *= 0.5

        def state_dict(self):
            return {"weight": self.weight}

    loss = ScheduledLoss()
    train, val = _loaders()
    trainer = make_trainer(linear_model(), train, val, max_epochs=3, checkpoint_dir=str(tmp_path), loss_fn=loss)
    trainer.fit()
    assert trainer.callbacks["loss_fn"] is loss
    assert loss.weight == 0.125
    assert torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]["loss_fn"] == {"weight": 0.125}
