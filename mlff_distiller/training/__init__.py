"""The training framework: a plain-PyTorch Trainer and its configuration.

Knows nothing of Hydra or of atoms; anything with ``nn.Module`` + batches + a loss trains here.
"""

from .callbacks import Callback
from .checkpoint import CheckpointError, load_checkpoint_file, load_model_weights, save_checkpoint
from .config import ConfigError, TrainingConfig
from .ema import ExponentialMovingAverage
from .loggers import ConsoleLogger, Logger, TensorBoardLogger
from .trainer import NonFiniteLossError, Trainer

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
    "load_checkpoint_file",
    "load_model_weights",
    "save_checkpoint",
]
