"""Early stopping on the monitored metric, with patience and min_delta."""

from __future__ import annotations

import pytest
from trainer_testkit import ScriptedValLoss, linear_model, loader, make_trainer, regression_data


def _run(val_values, max_epochs=None, **config):
    x, y = regression_data(n=16, seed=0)
    trainer = make_trainer(
        linear_model(),
        loader(x, y),
        loader(x, y),
        loss_fn=ScriptedValLoss(val_values),
        max_epochs=max_epochs or len(val_values),
        **config,
    )
    history = trainer.fit()
    return trainer, history


def test_stops_after_patience_validations_without_improvement():
    """Best at epoch 2; epochs 3 and 4 do not improve -> patience 2 stops after epoch 4."""
    trainer, history = _run([1.0, 0.5, 0.75, 0.625, 0.25, 0.125], early_stopping_patience=2)
    assert history["epoch"] == [1.0, 2.0, 3.0, 4.0]
    assert trainer.best_epoch == 2 and trainer.best_metric == 0.5
    assert trainer.early_stopping == {"best": 0.5, "wait": 2}


def test_improvement_resets_patience():
    """An improvement between stalls resets the counter: stall, improve, stall, stall -> stop at epoch 6."""
    _, history = _run([1.0, 1.0, 0.5, 0.75, 0.75, 0.75, 0.25, 0.1], early_stopping_patience=3)
    assert len(history["epoch"]) == 6


def test_min_delta_small_improvements_count_as_stalls():
    """Improvements of <= min_delta do not reset patience: 1.0 -> 0.96875 -> 0.9375 with min_delta 0.1
    and patience 2 stops after epoch 3 (the best model still tracks the raw minimum)."""
    trainer, history = _run([1.0, 0.96875, 0.9375, 0.5, 0.25], early_stopping_patience=2, early_stopping_min_delta=0.1)
    assert len(history["epoch"]) == 3
    assert trainer.best_metric == 0.9375 and trainer.best_epoch == 3


def test_improvements_larger_than_min_delta_do_not_stop():
    """Each validation improves by 0.125 > min_delta 0.1: training runs all epochs even with patience 1."""
    trainer, history = _run([1.0, 0.875, 0.75, 0.625, 0.5], early_stopping_patience=1, early_stopping_min_delta=0.1)
    assert len(history["epoch"]) == 5
    assert trainer.early_stopping == {"best": 0.5, "wait": 0}


def test_mode_max():
    """mode='max': a metric that stops rising triggers early stopping."""
    _, history = _run([0.25, 0.5, 0.5, 0.375, 1.0], early_stopping_patience=2, mode="max")
    assert len(history["epoch"]) == 4


def test_no_early_stopping_without_patience():
    """early_stopping_patience=None never stops, however long the plateau."""
    trainer, history = _run([1.0] * 6)
    assert len(history["epoch"]) == 6
    assert trainer.early_stopping["wait"] == 5


def test_patience_counts_validations_not_epochs():
    """With val_interval=2 only validated epochs count: patience 2 stops after the 3rd validation (epoch 6)."""
    _, history = _run([1.0, 1.0, 1.0, 1.0], max_epochs=10, val_interval=2, early_stopping_patience=2)
    assert history["epoch"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert history["val/loss"][1::2] == pytest.approx([1.0, 1.0, 1.0])
