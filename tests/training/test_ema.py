"""Exponential moving average of the weights: formula, use in validation, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_testkit import flat_params, loader, make_trainer, mlp, regression_data

from mlff_distiller.training import Callback, CheckpointError, ExponentialMovingAverage, load_model_weights


def _expected_shadow(initial, sequence, decay, warmup):
    shadow = initial.clone()
    for n, value in enumerate(sequence):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        shadow = d * shadow + (1 - d) * value
    return shadow


@pytest.mark.parametrize("warmup", [False, True])
def test_shadow_follows_formula_for_known_updates(warmup):
    """shadow_{n+1} = d_n shadow_n + (1 - d_n) p_{n+1}, d_n = decay, or min(decay, (1+n)/(10+n)) with warmup."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=warmup)
    initial = model.weight.detach().clone()
    sequence = [torch.tensor([[float(k), 0.5 * k]], dtype=torch.float64) for k in range(1, 31)]
    for value in sequence:
        with torch.no_grad():
            model.weight.copy_(value)
        ema.update(model)
    expected = _expected_shadow(initial, sequence, 0.9, warmup)
    torch.testing.assert_close(ema.shadow[0], expected, rtol=1e-12, atol=1e-12)
    assert ema.num_updates == 30
    # the first update written out: decay (1+0)/(10+0) = 0.1 with warmup (fast forgetting), else 0.9
    with torch.no_grad():
        model.weight.copy_(initial)
    single = ExponentialMovingAverage(model, decay=0.9, warmup=warmup)
    with torch.no_grad():
        model.weight.copy_(sequence[0])
    single.update(model)
    d0 = 0.1 if warmup else 0.9
    torch.testing.assert_close(single.shadow[0], d0 * initial + (1 - d0) * sequence[0], rtol=1e-12, atol=1e-12)


def test_applied_swaps_weights_temporarily():
    """applied() puts the shadow into the model and restores the training weights afterwards."""
    model = mlp()
    ema = ExponentialMovingAverage(model, decay=0.5, warmup=False)
    trained = flat_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = flat_params(model)
    ema.update(model)
    with ema.applied(model):
        torch.testing.assert_close(flat_params(model), 0.5 * trained + 0.5 * moved)
    assert torch.equal(flat_params(model), moved)
    averaged = ema.averaged_state_dict(model)
    torch.testing.assert_close(averaged["0.weight"], ema.shadow[0])


class ParamsAfterStep(Callback):
    def __init__(self):
        self.values = []

    def on_optimizer_step(self, trainer):
        self.values.append(flat_params(trainer.model))


@pytest.mark.parametrize("warmup", [False, True])
def test_trainer_updates_ema_after_every_optimizer_step(warmup):
    """Inside fit(), the shadow equals the formula applied to the parameters after each optimizer step."""
    x, y = regression_data(n=32, seed=0)
    model = mlp()
    initial = flat_params(model)
    steps = ParamsAfterStep()
    trainer = make_trainer(model, loader(x, y), max_epochs=3, ema_decay=0.8, ema_warmup=warmup, callbacks=[steps])
    trainer.fit()
    assert trainer.ema.num_updates == trainer.global_step == 12
    expected = _expected_shadow(initial, steps.values, 0.8, warmup)
    shadow = torch.cat([s.reshape(-1) for s in trainer.ema.shadow])
    torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=1e-6)


def _ema_run(tmp_path=None):
    x, y = regression_data(n=32, seed=0, noise=0.5)
    xv, yv = regression_data(n=16, seed=1)
    model = mlp()
    trainer = make_trainer(
        model,
        loader(x, y),
        loader(xv, yv),
        max_epochs=3,
        learning_rate=0.1,
        ema_decay=0.9,
        checkpoint_dir=str(tmp_path) if tmp_path else None,
    )
    history = trainer.fit()
    return trainer, history, (xv, yv)


def test_validation_uses_ema_weights():
    """val/loss equals the MSE computed with the EMA weights loaded, and differs from the raw-weight MSE."""
    trainer, history, (xv, yv) = _ema_run()
    averaged = mlp(seed=50)
    averaged.load_state_dict(trainer.ema.averaged_state_dict(trainer.model))
    with torch.no_grad():
        ema_loss = F.mse_loss(averaged(xv), yv).item()
        raw_loss = F.mse_loss(trainer.model(xv), yv).item()
    assert history["val/loss"][-1] == pytest.approx(ema_loss, rel=1e-5)
    assert abs(ema_loss - raw_loss) > 1e-3 * raw_loss
    # the raw weights are back in the model after validation
    assert not torch.equal(flat_params(trainer.model), flat_params(averaged))


def test_ema_state_checkpointed_restored_and_loadable_for_inference(tmp_path):
    """The checkpoint carries the EMA shadow; load_checkpoint restores it; load_model_weights(use_ema=True)
    loads the averaged weights, use_ema=False the raw ones."""
    trainer, _, _ = _ema_run(tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["ema"]["num_updates"] == 12 and state["ema"]["decay"] == 0.9
    for name, value in zip(trainer.ema._names, trainer.ema.shadow):
        assert torch.equal(state["ema"]["shadow"][name], value)

    x, y = regression_data(n=32, seed=0)
    restored = make_trainer(mlp(seed=3), loader(x, y), loader(x, y), max_epochs=3, learning_rate=0.1, ema_decay=0.9)
    restored.load_checkpoint(tmp_path / "last.pt")
    assert restored.ema.num_updates == 12
    for a, b in zip(restored.ema.shadow, trainer.ema.shadow):
        assert torch.equal(a, b)

    with_ema = load_model_weights(mlp(seed=4), tmp_path / "last.pt", use_ema=True)
    without = load_model_weights(mlp(seed=4), tmp_path / "last.pt", use_ema=False)
    assert torch.equal(flat_params(with_ema), torch.cat([s.reshape(-1) for s in trainer.ema.shadow]))
    assert torch.equal(flat_params(without), flat_params(trainer.model))
    assert not torch.equal(flat_params(with_ema), flat_params(without))


def test_resuming_without_ema_state_is_refused(tmp_path):
    """A checkpoint written without EMA cannot silently start an EMA run from scratch."""
    x, y = regression_data(n=16, seed=0)
    make_trainer(mlp(), loader(x, y), loader(x, y), max_epochs=1, checkpoint_dir=str(tmp_path)).fit()
    with_ema = make_trainer(mlp(), loader(x, y), loader(x, y), max_epochs=1, ema_decay=0.9)
    with pytest.raises(CheckpointError, match="no EMA state but ema_decay is set"):
        with_ema.load_checkpoint(tmp_path / "last.pt", strict_config=False)


def test_update_follows_the_model_it_is_given_and_in_place_moves():
    """update() keeps the model's parameters between steps: it must still see a parameter whose data was
    replaced in place (as model.to does) and switch to another model when given one."""
    model = nn.Linear(2, 1, bias=False).double()
    ema = ExponentialMovingAverage(model, decay=0.5, warmup=False)
    initial = model.weight.detach().clone()
    ema.update(model)
    model.weight.data = torch.tensor([[4.0, 8.0]], dtype=torch.float64)  # new storage, same Parameter
    ema.update(model)
    torch.testing.assert_close(ema.shadow[0], 0.5 * initial + 0.5 * model.weight.detach(), rtol=0, atol=1e-15)
    other = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        other.weight.fill_(-2.0)
    before = ema.shadow[0].clone()
    ema.update(other)
    torch.testing.assert_close(ema.shadow[0], 0.5 * before - 1.0, rtol=0, atol=1e-15)
