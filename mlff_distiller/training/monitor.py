"""The monitored metric (``TrainingConfig.monitor``): which epoch's model is the best, and when early
stopping ends the run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    """Best value of one metric and the early-stopping count, updated once per epoch."""

    name: str
    """The metric, e.g. ``val/force_mae``."""
    mode: str = "min"
    """``min`` when lower is better, ``max`` otherwise."""
    patience: int | None = None
    """Validations without an improvement larger than ``min_delta`` before early stopping (None: never)."""
    min_delta: float = 0.0
    best: float | None = None
    """Best value so far (None: none yet)."""
    best_epoch: int | None = None
    early_stopping: dict[str, Any] = field(default_factory=lambda: {"best": None, "wait": 0})
    """Reference value of early stopping (best by more than ``min_delta``) and validations since it improved."""

    def update(self, metrics: dict[str, float], epoch: int) -> tuple[bool, bool]:
        """Fold in epoch ``epoch``'s metrics; returns (a new best value, early stopping's patience is spent).

        An epoch without validation leaves a ``val/`` metric untouched; a metric never logged is an error.
        """
        if self.name not in metrics:
            if self.name.startswith("val/") and not any(k.startswith("val/") for k in metrics):
                return False, False
            raise ConfigError(
                f"monitor={self.name!r} is not a logged metric; available metrics are "
                f"{sorted(k for k in metrics if '/' in k)}."
            )
        value = metrics[self.name]
        improved = self._better(value, self.best)
        if improved:
            self.best, self.best_epoch = value, epoch
        if self._better(value, self.early_stopping["best"], self.min_delta):
            self.early_stopping = {"best": value, "wait": 0}
            return improved, False
        self.early_stopping["wait"] += 1
        stop = self.patience is not None and self.early_stopping["wait"] >= self.patience
        if stop:
            log.info(
                "Early stopping after epoch %d: %s has not improved by more than %g for %d validations "
                "(best %.6g at epoch %s).",
                epoch,
                self.name,
                self.min_delta,
                self.early_stopping["wait"],
                self.best,
                self.best_epoch,
            )
        return improved, stop

    def _better(self, value: float, reference: float | None, min_delta: float = 0.0) -> bool:
        if reference is None:
            return math.isfinite(value)
        return value < reference - min_delta if self.mode == "min" else value > reference + min_delta

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.name,
            "best_metric": self.best,
            "best_epoch": self.best_epoch,
            "early_stopping": dict(self.early_stopping),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.name = state["monitor"]
        self.best, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.early_stopping = dict(state["early_stopping"])


def monitored_metric(name: str, has_validation: bool) -> str:
    """The metric to monitor: ``name``, or ``train/loss`` for the default ``val/loss`` when nothing is validated."""
    if has_validation or not name.startswith("val/"):
        return name
    if name != "val/loss":
        raise ConfigError(
            f"monitor={name!r} needs a val_loader; without one only 'train/...' metrics exist "
            "(e.g. monitor='train/loss')."
        )
    return "train/loss"
