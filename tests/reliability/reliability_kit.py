"""Shared pieces of the reliability battery: a small resumable run, signal-sending callbacks, digests.

Imported by the tests, by ``kill_child.py`` (a training process the kill sweep SIGKILLs) and by
``mlff-train`` subprocesses through ``+callbacks.*._target_=reliability_kit.SignalAt``.
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlff_distiller.training import Callback, Logger, Trainer, TrainingConfig

SCHEDULERS: dict[str, dict[str, Any]] = {
    "cosine": {"lr_scheduler": "cosine", "optimizer": "adam", "learning_rate": 0.02},
    "step": {"lr_scheduler": "step", "optimizer": "sgd", "momentum": 0.9, "step_size": 2, "gamma": 0.5},
    "plateau": {"lr_scheduler": "plateau", "optimizer": "adam", "plateau_patience": 0, "plateau_factor": 0.5},
}


def build_run(
    checkpoint_dir: str | None,
    scheduler: str = "cosine",
    model_seed: int = 0,
    callbacks: Any = None,
    loggers: Any = (),
    trainer_cls: type[Trainer] = Trainer,
    **overrides: Any,
) -> Trainer:
    """Dropout MLP on noisy regression data, shuffled by the loader's own generator, EMA on, 6 batches
    per epoch. A resumed run is built with another ``model_seed`` so it cannot rely on equal initial weights."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 1, generator=gen)
    x = torch.randn(48, 4, generator=gen)
    y = x @ w + 0.3 * torch.randn(48, 1, generator=gen)
    xv = torch.randn(32, 4, generator=gen)
    yv = xv @ w + 2.0 * torch.randn(32, 1, generator=gen)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator())
    val = DataLoader(TensorDataset(xv, yv), batch_size=16)
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
    options: dict[str, Any] = {
        "max_epochs": 4,
        "batch_size": 8,
        "learning_rate": 0.05,
        "checkpoint_dir": checkpoint_dir,
        "device": "cpu",
        "log_interval": 2,
        "seed": 123,
        "ema_decay": 0.9,
        **SCHEDULERS[scheduler],
        **overrides,
    }
    config = TrainingConfig(**options)
    return trainer_cls(model, train, val, config=config, device="cpu", loggers=list(loggers), callbacks=callbacks)


class SignalAt(Callback):
    """Sends ``signum`` to this process ``times`` times right after optimizer step ``step``, after
    micro-batch ``batch`` (0-based) of the first epoch past step 1, or during the validation of epoch
    ``validation``, as a cluster scheduler or a user would."""

    def __init__(
        self,
        step: int | None = None,
        signum: int = signal.SIGTERM,
        times: int = 1,
        batch: int | None = None,
        validation: int | None = None,
    ) -> None:
        self.step, self.signum, self.times, self.batch, self.validation = step, int(signum), times, batch, validation
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_optimizer_step(self, trainer: Trainer) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._send()

    def on_train_batch_end(self, trainer: Trainer, batch_index: int, terms: dict[str, Any]) -> None:
        if self.batch is not None and trainer.global_step >= 1 and batch_index == self.batch:
            self._send()

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.validation is not None and trainer.epoch + 1 == self.validation:
            self._send()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names and exact bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trajectory(records: list[tuple[int, dict[str, float]]]) -> list[tuple[int, str, float]]:
    """Logged (step, name, value) triples without wall-clock metrics, for run-to-run comparison."""
    timed = ("epoch_time_s", "train/samples_per_s")
    return [(step, name, value) for step, metrics in records for name, value in metrics.items() if name not in timed]


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))


class CrashInJob(Callback):
    """Raises at the start of training in multirun job number ``job`` (a trial that fails)."""

    def __init__(self, job: int, this_job: int) -> None:
        self.job, self.this_job = job, this_job

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.this_job == self.job:
            raise RuntimeError(f"deliberate failure of job {self.job}")
