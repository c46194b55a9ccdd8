"""Small, deterministic building blocks shared by the training tests.

Imported by the test modules (pytest puts this directory on ``sys.path``) and by the
subprocess script in ``test_resume.py``, so everything here must be importable on its own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlff_distiller.training import Callback, Logger, Trainer, TrainingConfig


def make_config(**overrides: Any) -> TrainingConfig:
    """A TrainingConfig for tests: CPU, no checkpoints unless asked for, small run."""
    values: dict[str, Any] = {
        "max_epochs": 3,
        "batch_size": 8,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "momentum": 0.0,
        "checkpoint_dir": None,
        "device": "cpu",
        "log_interval": 1000,
        "seed": 0,
    }
    values.update(overrides)
    return TrainingConfig(**values)


def make_trainer(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any = None,
    *,
    loggers: Any = (),
    trainer_cls: type[Trainer] = Trainer,
    loss_fn: Any = None,
    callbacks: Any = None,
    optimizer_factory: Any = None,
    scheduler_factory: Any = None,
    batch_size_fn: Any = None,
    **config_overrides: Any,
) -> Trainer:
    """A silent CPU Trainer; keyword arguments other than the named ones are TrainingConfig fields."""
    return trainer_cls(
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        config=make_config(**config_overrides),
        device="cpu",
        loggers=list(loggers),
        loss_fn=loss_fn,
        callbacks=callbacks,
        optimizer=optimizer_factory,
        lr_scheduler=scheduler_factory,
        batch_size_fn=batch_size_fn,
    )


def regression_data(
    n: int = 64, dim: int = 4, seed: int = 0, noise: float = 0.0, map_seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (drawn with ``seed``) of the linear map ``y = x @ w + 0.5`` (``w`` drawn with ``map_seed``,
    so data sets with different ``seed`` share one learnable map), plus optional Gaussian noise."""
    w = torch.randn(dim, 1, generator=torch.Generator().manual_seed(10_000 + map_seed), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = x @ w + 0.5 + noise * torch.randn(n, 1, generator=gen, dtype=dtype)
    return x, y


def loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 8,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def linear_model(dim: int = 4, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, 1)


def mlp(dim: int = 4, hidden: int = 8, seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, 1))
    return nn.Sequential(*layers)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cosine_lr(lr: float, min_lr: float, t: int, total: int) -> float:
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / total)) / 2


class ScriptedValLoss:
    """Loss function: MSE while training; during validation the n-th validation pass reports
    ``values[n]`` (constant over its batches), so monitored metrics are fully controlled."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.validations = 0
        self._in_val = False

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if model.training:
            self._in_val = False
            return torch.nn.functional.mse_loss(out, y)
        if not self._in_val:  # first batch of a new validation pass
            self._in_val = True
            self.validations += 1
        return torch.tensor(self.values[self.validations - 1])


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.configs: list[dict[str, Any]] = []
        self.closed = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def log_config(self, config: dict[str, Any]) -> None:
        self.configs.append(config)

    def close(self) -> None:
        self.closed += 1


class StopAfterEpoch(Callback):
    """Interrupts ``fit()`` once ``trainer.epoch`` reaches ``epoch`` (simulates a killed run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.epoch == self.epoch:
            trainer.should_stop = True


# ---------------------------------------------------------------------------- resume set-up
RESUME_VARIANTS: dict[str, dict[str, Any]] = {
    "cosine": {"lr_scheduler": "cosine", "optimizer": "adam", "learning_rate": 0.02},
    "cosine_ema_loader_generator": {
        "lr_scheduler": "cosine",
        "optimizer": "sgd",
        "momentum": 0.9,
        "learning_rate": 0.05,
        "ema_decay": 0.9,
        "warmup_steps": 3,
        "_loader_generator": True,
    },
    "plateau_ema": {
        "lr_scheduler": "plateau",
        "optimizer": "adam",
        "learning_rate": 0.05,
        "plateau_patience": 0,
        "plateau_factor": 0.5,
        "ema_decay": 0.9,
    },
}


def build_resume_run(
    variant: str, checkpoint_dir: str, model_seed: int = 0, callbacks: Any = None, **overrides: Any
) -> Trainer:
    """The run used by the resume tests: dropout MLP, shuffled loader, 4 epochs.

    A resumed run is built with another ``model_seed`` so that it cannot silently rely on
    starting from the same initial weights.
    """
    options = {"max_epochs": 4, **RESUME_VARIANTS[variant], **overrides}
    use_generator = options.pop("_loader_generator", False)
    x, y = regression_data(n=48, seed=1, noise=0.3)
    xv, yv = regression_data(n=32, seed=2, noise=2.0)
    generator = torch.Generator() if use_generator else None
    train = loader(x, y, batch_size=8, shuffle=True, generator=generator)
    val = loader(xv, yv, batch_size=16)
    model = mlp(hidden=16, dropout=0.3, seed=model_seed)
    config = make_config(checkpoint_dir=checkpoint_dir, seed=123, **options)
    return Trainer(model, train, val, config=config, device="cpu", loggers=[], callbacks=callbacks)
