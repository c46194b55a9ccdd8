"""Optimizers and learning-rate schedulers: one path for the Python API's names and for Hydra partials.

Both reach the Trainer as factories, ``params -> optimizer`` and ``optimizer -> scheduler``: the names in
:class:`TrainingConfig` (``optimizer="adam"``, ``lr_scheduler="cosine"``) are mapped onto such partials
here, and the command line's ``conf/optimizer`` and ``conf/scheduler`` files are ``_partial_: true`` nodes.
The Trainer then supplies what only it knows, the length of the run: a scheduler with a horizon argument
(``CosineAnnealingLR``'s ``T_max``) gets the number of times it will be stepped, so a per-step cosine spans
``max_epochs * steps_per_epoch`` steps whichever way it was configured.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau, StepLR

from .checkpoint import CheckpointError
from .config import ConfigError, TrainingConfig

Scheduler = LRScheduler | ReduceLROnPlateau
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Scheduler]

HORIZON_ARGUMENTS: dict[type, str] = {CosineAnnealingLR: "T_max"}
"""Schedulers whose length the Trainer sets, and the argument that holds it."""
TIME_TICKS = 1000
"""Steps of a schedule annealed over ``max_time``: it advances one tick per 1/1000 of the budget spent."""


def optimizer_factory(config: TrainingConfig) -> OptimizerFactory:
    """The optimizer named by ``config.optimizer``, as a partial waiting for the parameters."""
    name = config.optimizer
    if name is None:
        raise ConfigError(
            "TrainingConfig.optimizer=None means the optimizer is given to the Trainer, but none "
            "was; pass optimizer=... or set optimizer to one of 'adam', 'adamw', 'sgd'."
        )
    common = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if name == "sgd":
        return functools.partial(torch.optim.SGD, **common, momentum=config.momentum, nesterov=config.nesterov)
    return functools.partial(torch.optim.AdamW if name == "adamw" else torch.optim.Adam, **common)


def build_optimizer(
    given: torch.optim.Optimizer | OptimizerFactory | None, config: TrainingConfig, model: torch.nn.Module
) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters: ``given`` (an optimizer, or a factory that wins over
    ``config.optimizer``) or the one ``config.optimizer`` names."""
    if isinstance(given, torch.optim.Optimizer):
        return given
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("The model has no trainable parameters (no parameter has requires_grad=True).")
    factory = given if given is not None else optimizer_factory(config)
    check_factory(factory, "optimizer")
    return factory(params)


def scheduler_factory(config: TrainingConfig) -> SchedulerFactory | None:
    """The scheduler named by ``config.lr_scheduler`` as a partial waiting for the optimizer (None: constant).

    cosine: anneals from ``learning_rate`` to ``min_lr`` over the run (the Trainer sets ``T_max``).
    step: multiplies the learning rate by ``gamma`` every ``step_size`` intervals.
    plateau: multiplies it by ``plateau_factor`` after more than ``plateau_patience`` validations without an
    improvement of ``config.monitor`` larger than ``early_stopping_min_delta`` (never below ``min_lr``).
    """
    name = config.lr_scheduler
    if name == "cosine":
        return functools.partial(CosineAnnealingLR, eta_min=config.min_lr)
    if name == "step":
        return functools.partial(StepLR, step_size=config.step_size, gamma=config.gamma)
    if name == "plateau":
        return functools.partial(
            ReduceLROnPlateau,
            mode=config.mode,
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
            threshold=config.early_stopping_min_delta,
            threshold_mode="abs",
        )
    return None


def check_factory(factory: Any, what: str) -> None:
    """Refuse a partial whose keywords its target does not accept, naming the key and the accepted ones
    (what a misspelt key in a config file gives); other callables are taken as they are."""
    if not isinstance(factory, functools.partial) or not callable(factory.func):
        if not callable(factory):
            raise ConfigError(f"The {what} must be a factory (a callable, e.g. a partial); got {factory!r}.")
        return
    try:
        signature = inspect.signature(factory.func)
    except (TypeError, ValueError):  # builtins without a signature
        return
    accepted = [name for name in signature.parameters if name not in ("self", "params", "optimizer")]
    unknown = [key for key in factory.keywords if key not in signature.parameters]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ConfigError(
            f"The {what} {factory.func.__name__} has no argument {unknown[0]!r} (set to "
            f"{factory.keywords[unknown[0]]!r}); accepted: {', '.join(accepted)}."
        )
    argument = HORIZON_ARGUMENTS.get(factory.func) if what == "scheduler" else None
    if argument is not None and argument in factory.keywords:
        raise ConfigError(
            f"The scheduler {factory.func.__name__} sets {argument}={factory.keywords[argument]!r}, but its "
            f"horizon is set by the Trainer (max_epochs or max_time, in scheduler_interval units, as "
            f"scheduler_horizon says): remove {argument}. For another horizon pass a built scheduler."
        )


def build_scheduler(factory: SchedulerFactory, optimizer: torch.optim.Optimizer, horizon: int | None) -> Scheduler:
    """``factory(optimizer)``, with ``horizon`` as its horizon argument when it has one (``T_max``)."""
    check_factory(factory, "scheduler")
    argument = horizon_argument(factory)
    if argument is None:
        scheduler = factory(optimizer)
    elif horizon is None:
        raise ConfigError(
            "scheduler_interval='step' needs a train_loader with a length: the Trainer sets "
            f"{argument} to max_epochs x optimizer steps per epoch."
        )
    else:
        scheduler = factory(optimizer, **{argument: max(horizon, 1)})
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise ConfigError(f"The scheduler factory returned {type(scheduler).__name__}, not a learning-rate scheduler.")
    return scheduler


def horizon_argument(factory: Any) -> str | None:
    """The horizon argument the Trainer fills in for ``factory`` (None when it has none)."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    return HORIZON_ARGUMENTS.get(target) if isinstance(target, type) else None


def time_tick(elapsed_s: float, max_time: float, anchor: tuple[int, float] = (0, 0.0)) -> int:
    """Position, in :data:`TIME_TICKS`, of a schedule annealed over ``max_time`` once ``elapsed_s`` is spent.

    ``anchor`` (tick, seconds) is where the schedule stood when the budget last changed (a resumed run
    given another ``max_time``): from there it goes on to the last tick at the new end of the budget.
    """
    tick, since = anchor
    share = (elapsed_s - since) / (max_time - since) if max_time > since else 1.0
    return min(TIME_TICKS, tick + int((TIME_TICKS - tick) * max(share, 0.0)))


class Schedule:
    """A learning-rate scheduler driven the way the config says: when it steps (after each optimizer step or
    each epoch, as ``scheduler_interval``; a plateau scheduler after each epoch, on the monitored metric) and
    how far (one step, or with ``scheduler_horizon='max_time'`` to the share of the budget spent).

    Built from a factory whose horizon the Trainer sets (a cosine), it spans the run and, on resume, the
    end of a longer one. A scheduler instance is taken as it is.
    """

    def __init__(
        self,
        given: Scheduler | SchedulerFactory | None,
        optimizer: torch.optim.Optimizer,
        config: TrainingConfig,
        steps_per_epoch: int | None,
    ) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.anchor: tuple[int, float] = (0, 0.0)
        """(tick, seconds) from which a ``max_time`` schedule runs to its end (moved when max_time changes)."""
        factory = given if given is not None else scheduler_factory(config)
        self.scheduler: Scheduler | None
        if factory is None or isinstance(factory, (LRScheduler, ReduceLROnPlateau)):
            self.scheduler, self.owns_horizon = factory, False
        else:
            self.scheduler = build_scheduler(factory, optimizer, self.horizon())
            self.owns_horizon = horizon_argument(factory) is not None
        if config.scheduler_horizon == "max_time" and not self.owns_horizon:
            name = type(self.scheduler).__name__ if self.scheduler is not None else "none"
            raise ConfigError(
                "TrainingConfig.scheduler_horizon='max_time' is invalid here: it anneals a scheduler whose horizon "
                f"the Trainer sets (a cosine) over the time budget, but the scheduler is {name}; accepted: "
                "'max_epochs', or a cosine (lr_scheduler='cosine' or a CosineAnnealingLR partial)."
            )

    def horizon(self) -> int | None:
        """Scheduler steps in the whole run (None: unknown, a per-step schedule over a loader without length)."""
        if self.config.scheduler_horizon == "max_time":
            return TIME_TICKS
        if self.config.scheduler_interval == "epoch":
            return self.config.max_epochs
        return None if self.steps_per_epoch is None else self.config.max_epochs * self.steps_per_epoch

    def step(self, at: str, elapsed_s: float, monitored: float | None = None) -> None:
        """Advance after an optimizer step (``at='step'``) or an epoch (``'epoch'``, with the monitored value)."""
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if at == "epoch" and monitored is not None:
                self.scheduler.step(monitored)
        elif at == self.config.scheduler_interval:
            if self.config.scheduler_horizon == "max_epochs":
                self.scheduler.step()
                return
            assert self.config.max_time is not None  # validated with the config
            target = time_tick(elapsed_s, self.config.max_time, self.anchor)
            while self.scheduler.last_epoch < target:
                self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scheduler_class": type(self.scheduler).__name__ if self.scheduler is not None else None,
            "time_anchor": list(self.anchor),
        }

    def load_state_dict(
        self, state: dict[str, Any], saved_config: dict[str, Any], elapsed_s: float, source: str
    ) -> None:
        """Restore the scheduler of a checkpoint (a ``Trainer.state_dict``); a horizon the Trainer owns then goes
        on from where it stands to the end of a longer run (max_epochs raised, or max_time changed with a time
        horizon) instead of rising again after its old end (a finished schedule stays at its end)."""
        own = type(self.scheduler).__name__ if self.scheduler is not None else None
        if (state["scheduler_class"] or None) != own:
            raise CheckpointError(
                f"Checkpoint {source!r} holds scheduler {state['scheduler_class']} but the Trainer uses {own}."
            )
        tick, since = state.get("time_anchor", (0, 0.0))
        self.anchor = (int(tick), float(since))
        if self.scheduler is None:
            return
        self.scheduler.load_state_dict(state["scheduler"])
        if not self.owns_horizon:
            return
        if self.config.scheduler_horizon == "max_time":
            if saved_config.get("max_time") != self.config.max_time:
                self.anchor = (self.scheduler.last_epoch, elapsed_s)
            return
        horizon, argument = self.horizon(), horizon_argument(type(self.scheduler))
        if horizon is not None and argument is not None:
            setattr(self.scheduler, argument, max(getattr(self.scheduler, argument), horizon))


class Warmup:
    """Linear learning-rate warmup that composes with any scheduler, plateau included.

    The scheduler owns ``param_group["lr"]``; during the first ``steps`` optimizer steps the Trainer
    scales it only for the duration of ``optimizer.step()`` (:meth:`applied`), so the scheduler never
    sees the scaled value and its own trajectory is unchanged.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def factor(self, step: int) -> float:
        """Multiplier for optimizer step number ``step`` (0-based)."""
        if step >= self.steps:
            return 1.0
        return (step + 1) / self.steps

    @contextlib.contextmanager
    def applied(self, optimizer: torch.optim.Optimizer, step: int) -> Iterator[None]:
        """The learning rates scaled for optimizer step ``step`` while the block runs."""
        factor = self.factor(step)
        if factor == 1.0:
            yield
            return
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            yield
        finally:
            for group, lr in zip(optimizer.param_groups, scheduled):
                group["lr"] = lr
