"""Optimizer and learning-rate scheduler builders, and the linear warmup that wraps any scheduler."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau, StepLR

from .config import ConfigError, TrainingConfig

Scheduler = LRScheduler | ReduceLROnPlateau


def build_optimizer(config: TrainingConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``params``."""
    if config.optimizer is None:
        raise ConfigError(
            "TrainingConfig.optimizer=None means the optimizer is given to the Trainer, but none "
            "was; pass optimizer=... or set optimizer to one of 'adam', 'adamw', 'sgd'."
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}")  # unreachable: config validated


def build_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler | None:
    """The scheduler named by ``config.lr_scheduler``.

    cosine: anneals from ``learning_rate`` to ``min_lr`` over the run (``max_epochs`` epochs, or
    ``max_epochs * steps_per_epoch`` optimizer steps when ``scheduler_interval == "step"``).
    step: multiplies the learning rate by ``gamma`` every ``step_size`` intervals.
    plateau: multiplies it by ``plateau_factor`` after more than ``plateau_patience`` validations
    without improvement of ``config.monitor`` (torch semantics; never below ``min_lr``).
    """
    name = config.lr_scheduler
    if name is None or name == "none":
        return None
    if name == "cosine":
        total = config.max_epochs * (steps_per_epoch if config.scheduler_interval == "step" else 1)
        return CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=config.min_lr)
    if name == "step":
        return StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if name == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode=config.mode,
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
            threshold=config.early_stopping_min_delta,
            threshold_mode="abs",
        )
    raise ValueError(f"unknown lr_scheduler {name!r}")  # unreachable: config validated


class Warmup:
    """Linear learning-rate warmup that composes with any scheduler, plateau included.

    The scheduler owns ``param_group["lr"]``; during the first ``steps`` optimizer steps the
    Trainer scales it only for the duration of ``optimizer.step()``, so the scheduler never sees
    the scaled value and its own trajectory is unchanged.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def factor(self, step: int) -> float:
        """Multiplier for optimizer step number ``step`` (0-based)."""
        if step >= self.steps:
            return 1.0
        return (step + 1) / self.steps
