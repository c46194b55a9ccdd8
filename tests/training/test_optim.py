"""Optimizers, learning-rate schedulers (one path: names and partials, the horizon set by the Trainer, a
time budget) and linear warmup, observed through the Trainer."""

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

from mlff_distiller.training import Callback, ConfigError
from mlff_distiller.training import trainer as trainer_module
from mlff_distiller.training.optim import (
    TIME_TICKS,
    Warmup,
    build_scheduler,
    optimizer_factory,
    scheduler_factory,
    time_tick,
)


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
def test_optimizer_names_are_partials_of_the_named_class(name, cls):
    """optimizer_factory(config) is a partial of the named class with the configured lr / weight_decay (and
    SGD momentum and nesterov), the same kind of factory the command line's optimizer group gives."""
    config = make_config(optimizer=name, learning_rate=0.0123, weight_decay=0.0456, momentum=0.7, nesterov=True)
    factory = optimizer_factory(config)
    assert isinstance(factory, functools.partial) and factory.func is cls
    optimizer = factory(linear_model().parameters())
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


def test_scheduler_names_are_partials_and_the_trainer_sets_the_cosine_horizon():
    """Each lr_scheduler name is a partial of the matching torch scheduler (none: no scheduler); a cosine
    partial gets T_max = the number of times the Trainer will step it, however it was configured."""
    params = list(linear_model().parameters())
    expected = {"cosine": CosineAnnealingLR, "step": StepLR, "plateau": ReduceLROnPlateau}
    for name, cls in expected.items():
        factory = scheduler_factory(make_config(lr_scheduler=name))
        assert factory.func is cls and "T_max" not in factory.keywords
        assert type(build_scheduler(factory, torch.optim.SGD(params, lr=0.1), 17)) is cls
    assert scheduler_factory(make_config(lr_scheduler="none")) is None
    cosine = build_scheduler(functools.partial(CosineAnnealingLR, eta_min=0.0), torch.optim.SGD(params, lr=0.1), 17)
    assert cosine.T_max == 17
    train, _ = _loaders(n_train=40, batch_size=8)  # 5 optimizer steps per epoch
    per_step = make_trainer(
        linear_model(), train, scheduler_factory=functools.partial(CosineAnnealingLR), scheduler_interval="step"
    )
    assert per_step.scheduler.T_max == 3 * 5  # max_epochs x steps per epoch


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (functools.partial(CosineAnnealingLR, T_max=4), r"sets T_max=4, but its horizon is set by the Trainer"),
        (functools.partial(CosineAnnealingLR, eta_mn=0.0), r"has no argument 'eta_mn' .*accepted: T_max, eta_min"),
        (functools.partial(StepLR, step_size=2, gama=0.5), r"StepLR has no argument 'gama'"),
    ],
)
def test_a_misconfigured_scheduler_partial_is_an_error_naming_the_key(factory, message):
    train, _ = _loaders()
    with pytest.raises(ConfigError, match=message):
        make_trainer(linear_model(), train, scheduler_factory=factory)
    with pytest.raises(ConfigError, match=r"Adam has no argument 'betas_typo'"):
        make_trainer(linear_model(), train, optimizer_factory=functools.partial(torch.optim.Adam, betas_typo=1))


def test_a_per_step_cosine_over_a_loader_without_length_is_refused():
    """The horizon of a per-step cosine needs the number of steps per epoch."""
    x, y = regression_data(n=16)
    batches = iter([(x[:8], y[:8]), (x[8:], y[8:])])  # no __len__
    with pytest.raises(ConfigError, match=r"scheduler_interval='step' needs a train_loader with a length"):
        make_trainer(linear_model(), batches, lr_scheduler="cosine", scheduler_interval="step")


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


# ------------------------------------------------------------------------- time budget (max_time)
class FakeClock:
    """Stands in for the Trainer's monotonic clock: one second passes with every optimizer step."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_optimizer_step(self, trainer):
        self.clock.now += 1.0


def _timed_trainer(monkeypatch, clock, directory, **config):
    monkeypatch.setattr(trainer_module, "monotonic", clock)
    train, val = _loaders(n_train=32, batch_size=8)  # 4 steps per epoch
    options = dict(max_epochs=50, checkpoint_dir=str(directory), learning_rate=0.1, **config)
    return make_trainer(linear_model(), train, val, callbacks=[Tick(clock)], **options)


def test_max_time_stops_after_the_step_that_spends_it_then_validates_and_saves(tmp_path, monkeypatch):
    """max_time=5.5 s at 1 s per step: the run stops after step 6 (epoch 2, batch 2); that epoch is validated
    and saved as the last one. Resumed with the same budget nothing more happens; with 9.5 s it trains on to
    step 10, the budget counting the first run's 6 s."""
    clock = FakeClock()
    trainer = _timed_trainer(monkeypatch, clock, tmp_path, max_time=5.5)
    history = trainer.fit()
    assert (trainer.global_step, trainer.epoch, history["epoch"]) == (6, 2, [1.0, 2.0])
    assert not math.isnan(history["val/loss"][-1])
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (saved["global_step"], saved["epoch"], saved["epoch_progress"]) == (6, 2, None)
    assert saved["elapsed_s"] == pytest.approx(6.0)

    same = _timed_trainer(monkeypatch, clock, tmp_path, max_time=5.5)
    same.load_checkpoint(tmp_path / "last.pt")
    same.fit()
    assert (same.global_step, same.epoch) == (6, 2)

    longer = _timed_trainer(monkeypatch, clock, tmp_path, max_time=9.5)
    longer.load_checkpoint(tmp_path / "last.pt")
    longer.fit()
    assert (longer.global_step, longer.epoch, longer.history["epoch"]) == (10, 3, [1.0, 2.0, 3.0])


def test_time_tick_follows_the_share_of_the_budget_spent():
    assert [time_tick(t, 8.0) for t in (0, 1, 4, 8, 9)] == [0, 125, 500, TIME_TICKS, TIME_TICKS]
    # Re-anchored at tick 500 after 4 s (a budget raised to 12 s): the rest of the ticks span the rest of it.
    assert [time_tick(t, 12.0, (500, 4.0)) for t in (4, 8, 12)] == [500, 750, TIME_TICKS]


def test_cosine_annealed_over_max_time(tmp_path, monkeypatch):
    """scheduler_horizon='max_time': the lr of step s is the cosine at the budget share spent before it (s/8
    of 8 s), non-increasing, at min_lr when the budget ends. Resumed halfway with the budget raised to 12 s,
    the schedule goes on from where it stood and reaches min_lr at the new end."""
    options = dict(lr_scheduler="cosine", scheduler_horizon="max_time", scheduler_interval="step", min_lr=0.01)
    clock = FakeClock()
    trainer = _timed_trainer(monkeypatch, clock, tmp_path / "straight", max_time=8.0, **options)
    lrs = _record_step_lrs(trainer)
    trainer.fit()
    assert trainer.global_step == 8
    assert lrs == pytest.approx([cosine_lr(0.1, 0.01, s, 8) for s in range(8)], rel=1e-7)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-7)

    half = _timed_trainer(monkeypatch, clock, tmp_path / "half", max_time=4.0, **options)
    half.fit()
    longer = _timed_trainer(monkeypatch, clock, tmp_path / "half", max_time=12.0, **options)
    longer.load_checkpoint(tmp_path / "half" / "last.pt")
    resumed_lrs = _record_step_lrs(longer)
    longer.fit()
    assert longer.global_step == 12
    assert all(a >= b for a, b in zip(resumed_lrs, resumed_lrs[1:]))
    assert resumed_lrs[0] < 0.1 and longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-7)


@pytest.mark.parametrize("options", [{"lr_scheduler": "step"}, {"lr_scheduler": "none"}])
def test_max_time_horizon_needs_a_cosine(options):
    train, _ = _loaders()
    with pytest.raises(ConfigError, match=r"scheduler_horizon='max_time' is invalid here"):
        make_trainer(linear_model(), train, max_time=10.0, scheduler_horizon="max_time", **options)
