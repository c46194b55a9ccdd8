"""The training framework: a plain-PyTorch Trainer and its configuration.

Knows nothing of Hydra or of atoms; anything with an ``nn.Module``, batches and a loss trains here.
Names are resolved lazily so that importing ``TrainingConfig`` (e.g. for ``mlff-train --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Callback": "callbacks",
    "CheckpointError": "checkpoint",
    "load_checkpoint_file": "checkpoint",
    "load_model_weights": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ConfigError": "config",
    "TrainingConfig": "config",
    "ExponentialMovingAverage": "ema",
    "ConsoleLogger": "loggers",
    "Logger": "loggers",
    "TensorBoardLogger": "loggers",
    "NonFiniteLossError": "trainer",
    "Trainer": "trainer",
    "TrainingInterrupted": "signals",
    "load_latest_checkpoint": "checkpoint",
    "seed_everything": "rng",
}

__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
    "ConsoleLogger",
    "ExponentialMovingAverage",
    "Logger",
    "NonFiniteLossError",
    "TensorBoardLogger",
    "Trainer",
    "TrainingConfig",
    "TrainingInterrupted",
    "load_checkpoint_file",
    "load_latest_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "seed_everything",
]

if TYPE_CHECKING:
    from .callbacks import Callback
    from .checkpoint import (
        CheckpointError,
        load_checkpoint_file,
        load_latest_checkpoint,
        load_model_weights,
        save_checkpoint,
    )
    from .config import ConfigError, TrainingConfig
    from .ema import ExponentialMovingAverage
    from .loggers import ConsoleLogger, Logger, TensorBoardLogger
    from .rng import seed_everything
    from .signals import TrainingInterrupted
    from .trainer import NonFiniteLossError, Trainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
