"""Optimizers, learning-rate schedulers and linear warmup, observed through the Trainer."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau, StepLR
from trainer_testkit import (
    ScriptedValLoss,
    cosine_lr,
    linear_model,
    loader,
    make_config,
    make_trainer,
    regression_data,
)

from mlff_distiller.training import Callback
from mlff_distiller.training.optim import Warmup, build_optimizer, build_scheduler


def _loaders(n_train=32, batch_size=8):
    x, y = regression_data(n=n_train, seed=0)
    xv, yv = regression_data(n=16, seed=1)
    return loader(x, y, batch_size), loader(xv, yv, batch_size)


def _record_step_lrs(trainer):
    """Learning rate actually used by every ``optimizer.step()`` (read inside the step)."""
    lrs: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


# ------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_build_optimizer_type_and_hyperparameters(name, cls):
    """build_optimizer returns the named class with the configured lr / weight_decay (and SGD momentum)."""
    config = make_config(optimizer=name, learning_rate=0.0123, weight_decay=0.0456, momentum=0.7, nesterov=True)
    optimizer = build_optimizer(config, linear_model().parameters())
    group = optimizer.param_groups[0]
    assert type(optimizer) is cls
    assert group["lr"] == 0.0123
    assert group["weight_decay"] == 0.0456
    if name == "sgd":
        assert group["momentum"] == 0.7
        assert group["nesterov"] is True


def test_trainer_accepts_optimizer_factory_and_instance():
    """An optimizer factory (e.g. a Hydra partial) or instance replaces config.optimizer."""
    train, _ = _loaders()
    factory = functools.partial(torch.optim.RMSprop, lr=0.003)
    trainer = make_trainer(linear_model(), train, optimizer_factory=factory)
    assert isinstance(trainer.optimizer, torch.optim.RMSprop)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.003

    model = linear_model()
    instance = torch.optim.SGD(model.parameters(), lr=0.2)
    trainer = make_trainer(model, train, optimizer_factory=instance)
    assert trainer.optimizer is instance


def test_trainer_accepts_scheduler_factory():
    """A scheduler factory is called with the Trainer's optimizer and stepped every epoch."""
    train, val = _loaders()
    factory = functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    trainer = make_trainer(linear_model(), train, val, scheduler_factory=factory, learning_rate=0.08, max_epochs=4)
    history = trainer.fit()
    assert history["lr"] == pytest.approx([0.08, 0.04, 0.02, 0.01], rel=1e-12)


def test_build_scheduler_types():
    """Each lr_scheduler name builds the matching torch scheduler (none: no scheduler)."""
    params = list(linear_model().parameters())
    expected = {"cosine": CosineAnnealingLR, "step": StepLR, "plateau": ReduceLROnPlateau}
    for name, cls in expected.items():
        scheduler = build_scheduler(make_config(lr_scheduler=name), torch.optim.SGD(params, lr=0.1), 5)
        assert type(scheduler) is cls
    assert build_scheduler(make_config(lr_scheduler="none"), torch.optim.SGD(params, lr=0.1), 5) is None


# ------------------------------------------------------------------------- schedules
def test_cosine_per_epoch_follows_formula():
    """history['lr'][e] == min_lr + (lr - min_lr) * (1 + cos(pi e / E)) / 2."""
    train, val = _loaders()
    epochs, lr, min_lr = 6, 0.1, 0.01
    trainer = make_trainer(
        linear_model(), train, val, lr_scheduler="cosine", learning_rate=lr, min_lr=min_lr, max_epochs=epochs
    )
    history = trainer.fit()
    expected = [cosine_lr(lr, min_lr, e, epochs) for e in range(epochs)]
    assert history["lr"] == pytest.approx(expected, rel=1e-9)
    # after the final epoch the schedule has reached min_lr
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(min_lr, rel=1e-9)


def test_step_scheduler_multiplies_by_gamma_every_step_size_epochs():
    """lr(e) == lr * gamma ** (e // step_size)."""
    train, val = _loaders()
    trainer = make_trainer(
        linear_model(), train, val, lr_scheduler="step", learning_rate=0.2, step_size=2, gamma=0.25, max_epochs=7
    )
    history = trainer.fit()
    assert history["lr"] == pytest.approx([0.2 * 0.25 ** (e // 2) for e in range(7)], rel=1e-12)


def test_cosine_per_step_follows_formula():
    """scheduler_interval='step': every optimizer step uses the cosine value at its step index over
    T = max_epochs * steps_per_epoch; history['lr'] holds the value at each epoch's first step."""
    train, val = _loaders(n_train=32, batch_size=8)  # 4 steps per epoch
    epochs, lr, min_lr = 3, 0.1, 0.0
    trainer = make_trainer(
        linear_model(),
        train,
        val,
        lr_scheduler="cosine",
        scheduler_interval="step",
        learning_rate=lr,
        min_lr=min_lr,
        max_epochs=epochs,
    )
    step_lrs = _record_step_lrs(trainer)
    history = trainer.fit()
    total = epochs * 4
    assert step_lrs == pytest.approx([cosine_lr(lr, min_lr, s, total) for s in range(total)], rel=1e-9, abs=1e-15)
    assert history["lr"] == pytest.approx([cosine_lr(lr, min_lr, 4 * e, total) for e in range(epochs)], rel=1e-9)


def test_cosine_per_step_respects_gradient_accumulation():
    """With accumulation, the per-step cosine horizon counts optimizer steps, not micro-batches."""
    train, val = _loaders(n_train=32, batch_size=4)  # 8 micro-batches -> 4 optimizer steps per epoch
    trainer = make_trainer(
        linear_model(),
        train,
        val,
        lr_scheduler="cosine",
        scheduler_interval="step",
        learning_rate=0.1,
        gradient_accumulation_steps=2,
        max_epochs=2,
        batch_size=4,
    )
    step_lrs = _record_step_lrs(trainer)
    trainer.fit()
    assert trainer.global_step == 8
    assert step_lrs == pytest.approx([cosine_lr(0.1, 0.0, s, 8) for s in range(8)], rel=1e-9)


def _plateau_trainer(val_values, **overrides):
    train, val = _loaders()
    options = dict(
        lr_scheduler="plateau", learning_rate=0.1, plateau_factor=0.5, plateau_patience=2, max_epochs=len(val_values)
    )
    options.update(overrides)
    return make_trainer(linear_model(), train, val, loss_fn=ScriptedValLoss(val_values), **options)


def test_plateau_reduces_after_more_than_patience_validations_without_improvement():
    """Constant val loss: the first validation sets the baseline; once more than plateau_patience (=2)
    validations have not improved, the lr is multiplied by plateau_factor and the count restarts
    (torch's ReduceLROnPlateau semantics, as documented)."""
    trainer = _plateau_trainer([1.0] * 8)
    history = trainer.fit()
    # epochs 2,3,4 stall -> reduced after epoch 4 (used in epoch 5); epochs 5,6,7 stall -> reduced after 7
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025], rel=1e-12)


def test_plateau_drops_only_by_factor_and_never_below_min_lr():
    """Every lr change is a multiplication by plateau_factor, clipped at min_lr; lr never rises."""
    trainer = _plateau_trainer([1.0] * 12, plateau_patience=0, min_lr=0.02)
    lrs = trainer.fit()["lr"]
    assert lrs[0] == 0.1
    for before, after in zip(lrs, lrs[1:]):
        assert after == pytest.approx(before) or after == pytest.approx(max(before * 0.5, 0.02))
    assert min(lrs) == pytest.approx(0.02)
    assert lrs[-1] == pytest.approx(0.02)


def test_plateau_keeps_lr_while_metric_improves_and_counts_only_validations():
    """An improving metric never lowers the lr; with val_interval=2 skipped epochs do not count."""
    improving = _plateau_trainer([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125], plateau_patience=0)
    assert improving.fit()["lr"] == [0.1] * 6
    # val_interval=2 over 6 epochs -> 3 validations (epochs 2, 4, 6), all with the same value:
    sparse = _plateau_trainer([1.0, 1.0, 1.0], plateau_patience=0, val_interval=2, max_epochs=6)
    history = sparse.fit()
    assert [math.isnan(v) for v in history["val/loss"]] == [True, False, True, False, True, False]
    # the lr may only change after a validated epoch, i.e. between epochs 2->3 and 4->5
    changes = [e for e in range(1, 6) if history["lr"][e] != history["lr"][e - 1]]
    assert set(changes) <= {2, 4}
    assert len(changes) >= 1


# ------------------------------------------------------------------------- warmup
def test_warmup_factor_is_linear():
    """Warmup.factor(step) == (step + 1) / steps during warmup, 1 afterwards."""
    warmup = Warmup(4)
    assert [warmup.factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_ramps_lr_of_optimizer_steps_and_leaves_epoch_scheduler_untouched():
    """During the first warmup_steps optimizer steps the lr used is scheduled_lr * (s + 1) / W; afterwards
    the steps use exactly the lrs of the same run without warmup, and the param_group lr is never scaled."""
    train, val = _loaders(n_train=32, batch_size=8)  # 4 steps per epoch
    common = dict(lr_scheduler="cosine", learning_rate=0.1, max_epochs=4)

    plain = make_trainer(linear_model(), train, val, **common)
    plain_lrs = _record_step_lrs(plain)
    plain_history = plain.fit()

    warm = make_trainer(linear_model(), train, val, warmup_steps=6, **common)
    warm_lrs = _record_step_lrs(warm)
    seen_between_steps: list[float] = []

    class GroupLr(Callback):  # the param_group lr once each step is done (what the scheduler sees)
        def on_optimizer_step(self, trainer):
            seen_between_steps.append(trainer.optimizer.param_groups[0]["lr"])

    warm.callbacks["group_lr"] = GroupLr()
    warm_history = warm.fit()

    assert len(warm_lrs) == 16
    expected = [plain_lrs[s] * min(1.0, (s + 1) / 6) for s in range(16)]
    assert warm_lrs == pytest.approx(expected, rel=1e-12)
    assert warm_lrs[6:] == plain_lrs[6:]
    # the scheduler's own trajectory (param_group lr outside optimizer.step) equals the plain run's
    assert seen_between_steps == plain_lrs
    assert warm_history["lr"][0] == pytest.approx(0.1 / 6)  # lr of the first step, warmup included
    assert warm_history["lr"][2:] == plain_history["lr"][2:]


def test_warmup_with_per_step_cosine():
    """Warmup composes with a per-step scheduler: the scheduler keeps advancing underneath."""
    train, val = _loaders(n_train=32, batch_size=8)
    trainer = make_trainer(
        linear_model(),
        train,
        val,
        lr_scheduler="cosine",
        scheduler_interval="step",
        learning_rate=0.1,
        warmup_steps=5,
        max_epochs=2,
    )
    step_lrs = _record_step_lrs(trainer)
    current: list[float] = []

    class Probe(Callback):  # reads current_lr() after each backward, i.e. right before the step
        def on_train_batch_end(self, trainer, batch_index, terms):
            current.append(trainer.current_lr())

    trainer.callbacks["probe"] = Probe()
    trainer.fit()
    expected = [cosine_lr(0.1, 0.0, s, 8) * min(1.0, (s + 1) / 5) for s in range(8)]
    assert step_lrs == pytest.approx(expected, rel=1e-9)
    assert current == pytest.approx(expected, rel=1e-9)
