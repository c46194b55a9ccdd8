"""Injected NaN/Inf: each bad step is skipped without touching weights or optimizer state, logged with its
step and batch index and counted; max_nonfinite_steps in a row stop the run with a clear error; the
checkpoints written around the bad steps hold only finite weights."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from reliability_kit import build_run, digest

from mlff_distiller.training import Callback, NonFiniteLossError, load_checkpoint_file


class Inject:
    """MSE loss; NaN on the chosen training calls (1-based), +inf on ``inf_calls``."""

    def __init__(self, nan_calls=(), inf_calls=()):
        self.nan_calls, self.inf_calls, self.calls = set(nan_calls), set(inf_calls), 0

    def __call__(self, model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if model.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                return loss * float("nan")
            if self.calls in self.inf_calls:
                return loss * float("inf")
        return loss


class Watch(Callback):
    def __init__(self):
        self.after_step = []

    def on_fit_start(self, trainer):
        self.after_step.append(self._state(trainer))

    def on_optimizer_step(self, trainer):
        self.after_step.append(self._state(trainer))

    @staticmethod
    def _state(trainer):
        optimizer = {
            f"{i}.{k}": v.clone()
            for i, s in trainer.optimizer.state_dict()["state"].items()
            for k, v in s.items()
            if torch.is_tensor(v)
        }
        return digest(trainer.model.state_dict()), digest(optimizer) if optimizer else ""


def test_injected_nan_and_inf_steps_are_skipped_logged_and_counted(tmp_path, caplog, reliability_report):
    watch = Watch()
    trainer = build_run(str(tmp_path), "cosine", ema_decay=None, callbacks=[watch])
    trainer.loss_fn = Inject(nan_calls={3, 4}, inf_calls={8})
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    skipped = [3, 4, 8]
    for step in skipped:
        assert watch.after_step[step] == watch.after_step[step - 1], f"step {step} changed the state"
    changed = [s for s in range(1, len(watch.after_step)) if watch.after_step[s] != watch.after_step[s - 1]]
    assert len(changed) == 24 - len(skipped)
    assert "Skipped optimizer step 3 (epoch 1, batch 3): non-finite loss=nan" in caplog.text
    assert "Skipped optimizer step 8 (epoch 2, batch 2): non-finite loss=inf" in caplog.text
    assert trainer.nonfinite == {"in_a_row": 0, "total": 3}
    for name in ("last.pt", "previous.pt", "best_model.pt"):
        state = load_checkpoint_file(tmp_path / name)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), name
    reliability_report(
        "non-finite",
        "NaN at steps 3-4 and Inf at step 8 injected: 3 steps skipped with weights and "
        "Adam moments unchanged, logged with step and batch, counted 3; checkpoints finite",
    )


def test_too_many_in_a_row_stop_with_a_clear_error(tmp_path):
    trainer = build_run(str(tmp_path), "cosine", max_nonfinite_steps=3)
    trainer.loss_fn = Inject(nan_calls={8, 9, 10})
    with pytest.raises(
        NonFiniteLossError,
        match=r"3 optimizer steps in a row .* \(last at step 10, epoch 2, batch 4; "
        r"max_nonfinite_steps=3\)",
    ):
        trainer.fit()
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 1  # the last good state is kept
