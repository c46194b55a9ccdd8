"""Gradient clipping (norm and value) and gradient accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trainer_testkit import RecordingLogger, flat_params, linear_model, loader, make_trainer, mlp, regression_data

from mlff_distiller.training import Callback


def _raw_gradient(model, x, y):
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    model.zero_grad()
    return grad


def _one_sgd_step(**clip):
    """One full-batch SGD step (lr=1, no momentum); returns (raw gradient, parameter change)."""
    x, y = regression_data(n=16, seed=0)
    y = 50 * y  # large targets -> large gradient
    model = linear_model()
    grad = _raw_gradient(model, x, y)
    before = flat_params(model)
    make_trainer(
        model, loader(x, y, batch_size=16), max_epochs=1, learning_rate=1.0, momentum=0.0, batch_size=16, **clip
    ).fit()
    return grad, flat_params(model) - before


def test_grad_clip_limits_update_norm():
    """With SGD lr=1, the parameter change equals -grad * grad_clip / |grad| when |grad| > grad_clip."""
    grad, change = _one_sgd_step(grad_clip=0.5)
    assert grad.norm() > 10  # clipping is really active
    assert change.norm().item() == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(change, -grad * 0.5 / grad.norm(), rtol=1e-5, atol=1e-7)


def test_grad_clip_leaves_small_gradients_alone():
    """A gradient whose norm is below grad_clip is applied unchanged."""
    grad, change = _one_sgd_step(grad_clip=1e6)
    torch.testing.assert_close(change, -grad, rtol=1e-5, atol=1e-6)


def test_grad_clip_value_clips_elementwise():
    """grad_clip_value clamps each gradient element to [-v, v] (no rescaling of the others)."""
    grad, change = _one_sgd_step(grad_clip_value=100.0)
    assert (grad.abs() > 100.0).any() and (grad.abs() < 100.0).any()  # both regimes present
    torch.testing.assert_close(change, -grad.clamp(-100.0, 100.0), rtol=1e-5, atol=1e-6)


def test_grad_norm_is_logged_when_clipping():
    """With grad_clip, the pre-clipping gradient norm is logged as train/grad_norm_step."""
    x, y = regression_data(n=16, seed=0)
    y = 50 * y
    model = linear_model()
    grad = _raw_gradient(model, x, y)
    logger = RecordingLogger()
    make_trainer(
        model,
        loader(x, y, batch_size=16),
        max_epochs=1,
        learning_rate=1.0,
        grad_clip=0.5,
        log_interval=1,
        batch_size=16,
        loggers=[logger],
    ).fit()
    step_records = [m for _, m in logger.records if "train/grad_norm_step" in m]
    assert len(step_records) == 1
    assert step_records[0]["train/grad_norm_step"] == pytest.approx(grad.norm().item(), rel=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulation_matches_larger_batch(momentum):
    """accumulation 2 x batch 4 == accumulation 1 x batch 8 (same data order, mean MSE, SGD)."""
    x, y = regression_data(n=32, seed=5, noise=0.1)
    small, large = mlp(seed=1), mlp(seed=1)
    common = dict(max_epochs=3, learning_rate=0.05, momentum=momentum, optimizer="sgd")
    accumulated = make_trainer(small, loader(x, y, batch_size=4), gradient_accumulation_steps=2, batch_size=4, **common)
    accumulated.fit()
    plain = make_trainer(large, loader(x, y, batch_size=8), batch_size=8, **common)
    plain.fit()
    assert accumulated.global_step == plain.global_step == 12
    torch.testing.assert_close(flat_params(small), flat_params(large), rtol=0, atol=1e-6)
    assert not torch.equal(flat_params(small), flat_params(mlp(seed=1)))  # training did move the weights


def test_trailing_partial_accumulation_window_averages_its_own_micro_batches():
    """3 batches with accumulation 2: the 2nd optimizer step holds one micro-batch, so ("loss averaged" over
    the window's micro-batches) it must use that batch's full gradient, as a plain step would."""
    x, y = regression_data(n=12, seed=5, noise=0.1)
    model, reference = linear_model(), linear_model()
    make_trainer(
        model, loader(x, y, batch_size=4), gradient_accumulation_steps=2, batch_size=4, max_epochs=1, learning_rate=0.1
    ).fit()

    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for window in (slice(0, 8), slice(8, 12)):  # window mean of per-batch mean MSEs
        sgd.zero_grad()
        xs, ys = x[window], y[window]
        batches = [(xs[i : i + 4], ys[i : i + 4]) for i in range(0, len(xs), 4)]
        (sum(F.mse_loss(reference(bx), by) for bx, by in batches) / len(batches)).backward()
        sgd.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-6)


def test_accumulation_counts_optimizer_steps_and_logs_window_mean_loss():
    """7 micro-batches with accumulation 3 -> 3 optimizer steps per epoch (3 + 3 + 1), and each logged
    train/loss_step is the mean loss of that step's micro-batches."""
    x, y = regression_data(n=28, seed=0)
    batch_losses: list[float] = []

    class Batches(Callback):
        def on_train_batch_end(self, trainer, batch_index, terms):
            batch_losses.append(float(terms["loss"]))

    logger = RecordingLogger()
    trainer = make_trainer(
        linear_model(),
        loader(x, y, batch_size=4),
        gradient_accumulation_steps=3,
        batch_size=4,
        max_epochs=2,
        log_interval=1,
        loggers=[logger],
        callbacks=[Batches()],
    )
    trainer.fit()
    assert trainer.global_step == 6
    logged = [(step, m["train/loss_step"]) for step, m in logger.records if "train/loss_step" in m]
    windows = [(0, 3), (3, 6), (6, 7), (7, 10), (10, 13), (13, 14)]
    expected = [sum(batch_losses[a:b]) / (b - a) for a, b in windows]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)
