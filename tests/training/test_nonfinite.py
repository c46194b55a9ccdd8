"""The non-finite guard: NaN/inf steps are skipped; too many in a row abort the run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from trainer_testkit import flat_params, linear_model, loader, make_trainer, regression_data

from mlff_distiller.training import Callback, NonFiniteLossError


class PoisonedLoss:
    """MSE, except on the chosen (0-based) training calls where it returns NaN (``mode='loss'``) or a
    finite value whose gradient is NaN (``mode='grad'``)."""

    def __init__(self, bad_calls, mode="loss"):
        self.bad_calls = set(bad_calls)
        self.mode = mode
        self.calls = 0

    def __call__(self, model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if not model.training:
            return loss
        index, self.calls = self.calls, self.calls + 1
        if index not in self.bad_calls:
            return loss
        if self.mode == "loss":
            return loss * float("nan")
        return _NaNGradient.apply(loss)


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward (a finite loss with a broken gradient)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Snapshots(Callback):
    """Model parameters and optimizer state after every optimizer step (index 0: before training)."""

    def __init__(self):
        self.params: list[torch.Tensor] = []
        self.optim: list[dict] = []

    def on_fit_start(self, trainer):
        self._take(trainer)

    def on_optimizer_step(self, trainer):
        self._take(trainer)

    def _take(self, trainer):
        self.params.append(flat_params(trainer.model))
        self.optim.append(copy.deepcopy(trainer.optimizer.state_dict()["state"]))


def _assert_same_optim_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name


def _trainer(loss, **config):
    x, y = regression_data(n=32, seed=0)
    snaps = Snapshots()
    options = dict(max_epochs=2, optimizer="adam", learning_rate=0.05)
    options.update(config)
    trainer = make_trainer(linear_model(), loader(x, y), loader(x, y), loss_fn=loss, callbacks=[snaps], **options)
    return trainer, snaps


def test_nan_loss_step_is_skipped_and_training_continues():
    """A NaN loss on step 5 leaves parameters and Adam state exactly as after step 4; later steps train."""
    trainer, snaps = _trainer(PoisonedLoss({5}))
    history = trainer.fit()
    assert trainer.global_step == 8
    assert torch.equal(snaps.params[6], snaps.params[5])  # index i+1 = after step i (0-based)
    _assert_same_optim_state(snaps.optim[6], snaps.optim[5])
    assert int(snaps.optim[6][0]["step"]) == 5  # Adam counted 5 real steps, not 6
    for i in range(len(snaps.params) - 1):  # every other step moved the weights
        if i != 5:
            assert not torch.equal(snaps.params[i + 1], snaps.params[i]), i
    assert torch.isfinite(flat_params(trainer.model)).all()
    assert trainer.nonfinite == {"in_a_row": 0, "total": 1}
    assert math.isfinite(history["val/loss"][-1])


def test_nan_loss_raises_after_max_nonfinite_steps_in_a_row():
    """max_nonfinite_steps consecutive NaN steps raise NonFiniteLossError; nothing was applied before."""
    trainer, snaps = _trainer(PoisonedLoss(range(100)), max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row .*max_nonfinite_steps=3"):
        trainer.fit()
    assert trainer.global_step == 2  # the third bad step raised before being counted
    assert all(torch.equal(p, snaps.params[0]) for p in snaps.params)


def test_isolated_nan_steps_do_not_accumulate_towards_the_limit():
    """Non-consecutive NaN steps reset the in-a-row counter: 4 isolated NaNs with a limit of 2 are fine."""
    trainer, _ = _trainer(PoisonedLoss({0, 2, 4, 6}), max_nonfinite_steps=2)
    trainer.fit()
    assert trainer.nonfinite == {"in_a_row": 0, "total": 4}


def test_nan_gradient_with_finite_loss_is_skipped_when_clipping():
    """With grad_clip, a finite loss whose gradient is NaN is detected through the gradient norm."""
    trainer, snaps = _trainer(PoisonedLoss({3}, mode="grad"), grad_clip=10.0)
    trainer.fit()
    assert torch.equal(snaps.params[4], snaps.params[3])
    assert torch.isfinite(flat_params(trainer.model)).all()
    assert trainer.nonfinite["total"] == 1


def test_nan_gradient_with_finite_loss_is_skipped_without_clipping():
    """The guard is documented for 'non-finite loss/gradient': a NaN gradient must never reach the weights,
    whether or not grad_clip is set."""
    trainer, snaps = _trainer(PoisonedLoss({3}, mode="grad"))
    trainer.fit()
    assert torch.isfinite(flat_params(trainer.model)).all()
    assert torch.equal(snaps.params[4], snaps.params[3])
    assert trainer.nonfinite["total"] == 1
