"""The training loop: a plain-PyTorch `Trainer` whose `fit()` can be read top to bottom."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from . import distributed
from .callbacks import Callback
from .checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    PREVIOUS,
    CheckpointError,
    capture_rng_state,
    config_fingerprint,
    epoch_checkpoints,
    link_checkpoint,
    load_model_state,
    read_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from .config import ConfigError, TrainingConfig
from .ema import ExponentialMovingAverage
from .loggers import ConsoleLogger, Logger
from .metrics import Mean, MetricSums
from .optim import Scheduler, Warmup, build_optimizer, build_scheduler

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], "torch.Tensor | dict[str, torch.Tensor]"]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Scheduler]

# SIGTERM: kill, SLURM at the time limit; SIGINT: Ctrl-C; SIGUSR1/2: SLURM's --signal warning (submitit uses USR2).
PREEMPTION_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)

# Config fields that may change between an interrupted run and its continuation; any other
# difference changes the optimisation itself and is refused unless explicitly allowed.
RESUMABLE_CHANGES = frozenset(
    {
        "max_epochs",
        "checkpoint_dir",
        "overwrite_checkpoints",
        "log_interval",
        "val_interval",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "max_nonfinite_steps",
        "keep_last",
        "checkpoint_every_n_steps",
        "handle_signals",
        "device",
        "extra",
    }
)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class TrainingInterrupted(Exception):
    """``fit()`` stopped on SIGTERM/SIGINT after saving its state; resume from ``checkpoint``.

    ``exit_code`` is the conventional status of a process ended by the signal (143 SIGTERM, 130 SIGINT).
    """

    def __init__(self, signum: int, checkpoint: Path | None, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum


class Trainer:
    """Trains ``model`` on ``train_loader``, validating on ``val_loader``.

    Args:
        model: any ``nn.Module``; it may use autograd inside ``forward`` (forces as -dE/dx),
            also during validation.
        train_loader: an iterable of batches (usually a ``DataLoader``).
        val_loader: batches for validation; None disables validation.
        config: a :class:`TrainingConfig` (or a mapping of its fields); defaults when None.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; None uses ``config.device``.
        loss_fn: ``f(model, batch) -> Tensor | dict``; a dict's ``"loss"`` is optimised and its other
            terms are logged. None: ``compute_loss`` (override it in a subclass) or, by default,
            MSE of ``model(inputs)`` against ``targets`` for ``(inputs, targets)`` batches.
        optimizer: an optimizer, or a factory ``params -> optimizer`` (e.g. a Hydra partial);
            None builds ``config.optimizer``.
        lr_scheduler: a scheduler, or a factory ``optimizer -> scheduler``; None builds
            ``config.lr_scheduler``. ``ReduceLROnPlateau`` steps on the monitored metric, others
            every ``config.scheduler_interval``.
        callbacks: callbacks, as a list or a name-keyed dict.
        loggers: metric loggers; None gives a :class:`ConsoleLogger`.
        batch_size_fn: number of samples in a batch (for averaging and throughput); by default the
            leading dimension of the first tensor found in the batch.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        config: TrainingConfig | Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        lr_scheduler: Scheduler | SchedulerFactory | None = None,
        callbacks: Sequence[Callback] | Mapping[str, Callback] | None = None,
        loggers: Sequence[Logger] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        if config is None:
            config = TrainingConfig()
        elif isinstance(config, Mapping):
            config = TrainingConfig.from_dict(dict(config))
        elif not isinstance(config, TrainingConfig):
            raise ConfigError(
                f"config must be a TrainingConfig or a mapping of its fields, not {type(config).__name__}."
            )
        self.config = config
        self.device = resolve_device(device if device is not None else config.device)
        self._check_precision()

        self.model = model.to(self.device)
        # Under torchrun: gradients are averaged by DistributedDataParallel; rank 0 writes all files.
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main_process = self.rank == 0
        self._ddp: nn.Module | None = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.batch_size_fn = batch_size_fn or infer_batch_size
        self.monitor = config.monitor
        if val_loader is None and self.monitor.startswith("val/"):
            if self.monitor != "val/loss":
                raise ConfigError(
                    f"monitor={self.monitor!r} needs a val_loader; without one only 'train/...' "
                    "metrics exist (e.g. monitor='train/loss')."
                )
            self.monitor = "train/loss"
        self._warn_on_batch_size_mismatch()

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("The model has no trainable parameters (no parameter has requires_grad=True).")
        if optimizer is None:
            self.optimizer = build_optimizer(config, params)
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizer(params)
        self.steps_per_epoch = _steps_per_epoch(train_loader, config.gradient_accumulation_steps)
        if self.world_size > 1 and self.steps_per_epoch is None:
            raise ConfigError(
                "Under torchrun the train_loader needs a length (each process must know which micro-batch "
                "ends an accumulation window); got a loader without __len__."
            )
        if lr_scheduler is None:
            if config.lr_scheduler != "none" and config.scheduler_interval == "step" and self.steps_per_epoch is None:
                raise ConfigError("scheduler_interval='step' needs a train_loader with a length.")
            self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch or 1)
        elif isinstance(lr_scheduler, (torch.optim.lr_scheduler.LRScheduler, ReduceLROnPlateau)):
            self.scheduler = lr_scheduler
        else:
            self.scheduler = lr_scheduler(self.optimizer)
        self.warmup = Warmup(config.warmup_steps) if config.warmup_steps > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.ema = (
            ExponentialMovingAverage(self.model, config.ema_decay, config.ema_warmup)
            if config.ema_decay is not None
            else None
        )

        self.loggers: list[Logger] = list(loggers) if loggers is not None else [ConsoleLogger()]
        if not self.is_main_process:
            self.loggers = []
        self.callbacks: dict[str, Callback] = _name_callbacks(callbacks)
        for logger in self.loggers:
            self.callbacks.setdefault(f"logger/{type(logger).__name__}", logger)
        if isinstance(loss_fn, Callback):
            self.callbacks.setdefault("loss_fn", loss_fn)

        self.checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.early_stopping = {"best": None, "wait": 0}
        self.nonfinite = {"in_a_row": 0, "total": 0}
        self.history: dict[str, list[float]] = {}
        self.should_stop = False
        self.resumed_from: str | None = None
        # Position inside the running epoch (None between epochs); saved so a run resumes mid-epoch.
        self.epoch_progress: dict[str, Any] | None = None
        self._signal_received: int | None = None  # set by the signal handler, at any moment
        self._stop_signal: int | None = None  # the stop all processes agreed on, at a step boundary
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, list[float]]:
        """Train until ``max_epochs`` or early stopping; returns the per-epoch history.

        ``history[name][i]`` is metric ``name`` after epoch ``history["epoch"][i]``; metrics not
        computed in an epoch (validation between ``val_interval``s) are NaN there.
        """
        with self._checkpoint_dir_lock(), self._preemption_signals():
            self._check_checkpoint_dir()
            if self.resumed_from is None and self.global_step == 0 and self.config.seed is not None:
                seed_everything(self.config.seed, self.train_loader)
            for logger in self.loggers:
                logger.log_config(self.config.to_dict())
            self.should_stop = False
            self._call("on_fit_start")
            try:
                while self.epoch < self.config.max_epochs and not self.should_stop:
                    self._run_epoch()
                    self._agree_on_stop()
                    if self._stop_signal is not None:
                        self._stop_on_signal(f"after epoch {self.epoch}")
            finally:
                self._call("on_fit_end")
                for logger in self.loggers:
                    logger.close()
        return self.history

    def _run_epoch(self) -> None:
        start = time.perf_counter()
        lr = self.epoch_progress["lr"] if self.epoch_progress is not None else self.current_lr()
        train_metrics, samples, train_time = self.train_epoch()
        metrics: dict[str, float] = {"epoch": float(self.epoch + 1), **train_metrics, "lr": lr}
        last_epoch = self.epoch + 1 == self.config.max_epochs or self.should_stop
        if self.val_loader is not None and ((self.epoch + 1) % self.config.val_interval == 0 or last_epoch):
            val_metrics = self.validate(self.val_loader, prefix="val")
            metrics.update(val_metrics)
            self._call("on_validation_end", val_metrics)
        self.epoch += 1
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["train/samples_per_s"] = samples / train_time if train_time > 0 else float("nan")

        improved = self._track_monitor(metrics)
        self._step_scheduler_after_epoch(metrics.get(self.monitor))
        self._call("on_train_epoch_end", metrics)
        self._record(metrics)
        log.info(
            "epoch %d/%d: %s",
            self.epoch,
            self.config.max_epochs,
            ", ".join(f"{k} {v:.5g}" for k, v in metrics.items() if k != "epoch"),
        )
        if self.checkpoint_dir is not None:
            self._write_checkpoints(best=improved, epoch_end=True)

    def train_epoch(self) -> tuple[dict[str, float], int, float]:
        """One pass over ``train_loader`` (or the rest of it, after a mid-epoch resume).

        Returns the loss terms (exact means over the epoch, see :mod:`.metrics`), the number of samples
        and the training time in s.
        """
        start = time.perf_counter()
        self.model.train()
        progress = self._begin_epoch_progress()
        self._call("on_train_epoch_start")
        accumulate = self.config.gradient_accumulation_steps
        num_batches = _safe_len(self.train_loader)
        every = self.config.checkpoint_every_n_steps
        window = MetricSums()
        window_samples = micro = 0
        self.optimizer.zero_grad(set_to_none=True)
        for batch_index, batch in self._epoch_batches(progress):
            batch = move_to_device(batch, self.device)
            n = self.batch_size_fn(batch)
            steps_now = micro + 1 == accumulate or batch_index + 1 == num_batches
            # Gradients are averaged across processes only on the micro-batch that completes a window.
            sync = self._ddp.no_sync() if self._ddp is not None and not steps_now else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    terms = self._loss_terms(batch)
                scaled = terms["loss"] / accumulate
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            detached = _detach(terms)
            window.add(detached, n)
            window_samples += n
            micro += 1
            self._call("on_train_batch_end", batch_index, detached)
            # A loader without a length ends inside its last window; that window is stepped below.
            if micro == accumulate or batch_index + 1 == num_batches:
                self._finish_window(progress, window, window_samples, micro, batch_index)
                window, window_samples, micro = MetricSums(), 0, 0
                progress["batches"] = batch_index + 1
                if self.world_size == 1:  # under DDP _optimizer_step has agreed on it
                    self._stop_signal = self._signal_received
                if self._stop_signal is not None:
                    progress["elapsed_s"] += time.perf_counter() - start
                    self._stop_on_signal(f"in epoch {self.epoch + 1} after batch {batch_index + 1}")
                if self.should_stop:
                    break
                if every is not None and self.global_step % every == 0 and batch_index + 1 != num_batches:
                    progress["elapsed_s"] += time.perf_counter() - start
                    start = time.perf_counter()
                    if self.checkpoint_dir is not None:
                        self._write_checkpoints(best=False, epoch_end=False)
        if micro:
            self._finish_window(progress, window, window_samples, micro, progress["batches"] + micro - 1)
            progress["batches"] += micro
        if progress["batches"] == 0:
            raise RuntimeError("train_loader yielded no batches.")
        self.epoch_progress = None
        elapsed = progress["elapsed_s"] + time.perf_counter() - start
        sums, samples, processed = self._reduce_sums(progress["sums"], progress["samples"], progress["processed"])
        if samples == 0:  # every step of the epoch was skipped as non-finite
            return {"train/loss": math.nan}, processed, elapsed
        return sums.compute(prefix="train/"), processed, elapsed

    def _reduce_sums(self, sums: MetricSums, samples: int, processed: int = 0) -> tuple[MetricSums, int, int]:
        """Totals and counts over all processes (one all-reduce); unchanged in a single process."""
        if self.world_size == 1:
            return sums, samples, processed
        # A process may hold no terms (an empty shard, a resumed partial epoch): agree on the names first.
        gathered: list[tuple[list[str], list[str]]] = [([], []) for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, (sorted(sums.sums), sorted(sums.roots)))
        names = sorted(set().union(*(g[0] for g in gathered)))
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        counts = torch.tensor([float(samples), float(processed)], dtype=torch.float64, device=self.device)
        packed = torch.cat([sums.sums.get(k, zero).to(self.device) for k in names] + [counts])
        distributed.all_reduce_(packed)
        reduced = MetricSums()
        reduced.sums = {k: packed[2 * i : 2 * i + 2] for i, k in enumerate(names)}
        reduced.roots = set().union(*(g[1] for g in gathered))
        return reduced, int(packed[-2].item()), int(packed[-1].item())

    def _agree_on_stop(self) -> None:
        """All processes stop at the same point when any of them received a stop signal; only the
        agreed value is acted on (a signal arriving later is agreed on at the next check)."""
        if self.world_size == 1:
            self._stop_signal = self._signal_received
            return
        flag = torch.tensor(float(self._signal_received or 0), device=self.device)
        distributed.all_reduce_(flag, "max")
        if flag.item() > 0:
            self._stop_signal = int(flag.item())

    def _finish_window(
        self, progress: dict[str, Any], window: MetricSums, samples: int, micro: int, batch_index: int
    ) -> None:
        """Step on a complete accumulation window and fold it into the epoch's sums."""
        progress["processed"] += samples
        if self._optimizer_step(window.mean("loss"), micro, batch_index):
            progress["sums"].merge(window)
            progress["samples"] += samples

    def _begin_epoch_progress(self) -> dict[str, Any]:
        if self.epoch_progress is not None:  # resumed mid-epoch
            return self.epoch_progress
        loader_generator = getattr(self.train_loader, "generator", None)
        self.epoch_progress = {
            "batches": 0,  # micro-batches consumed, always at an optimizer-step boundary when saved
            "processed": 0,
            "samples": 0,  # in applied (finite) optimizer steps
            "sums": MetricSums(),
            "elapsed_s": 0.0,
            "lr": self.current_lr(),
            # The RNG states the loader's order is drawn from, to replay that order on resume.
            "rng": capture_rng_state(),
            "loader_generator": loader_generator.get_state() if isinstance(loader_generator, torch.Generator) else None,
        }
        return self.epoch_progress

    def _epoch_batches(self, progress: dict[str, Any]) -> Iterable[tuple[int, Any]]:
        """The epoch's (index, batch) pairs; after a mid-epoch resume, the order is replayed from the
        epoch's starting RNG state and the batches already trained on are skipped."""
        skip = progress["batches"]
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the order is a function of (seed, epoch)
            sampler.set_epoch(self.epoch)
        if skip == 0:
            return enumerate(self.train_loader)
        now = capture_rng_state()
        restore_rng_state(progress["rng"])
        loader_generator = getattr(self.train_loader, "generator", None)
        if progress["loader_generator"] is not None and isinstance(loader_generator, torch.Generator):
            loader_generator.set_state(progress["loader_generator"])
        if getattr(self.train_loader, "persistent_workers", False) and not hasattr(sampler, "set_epoch"):
            log.warning(
                "Resuming inside an epoch with persistent DataLoader workers and a random sampler: the loader "
                "draws its seeds differently in a fresh process, so the rest of this epoch's order is not the "
                "uninterrupted run's. A DistributedSampler (order = f(seed, epoch)) makes it exact."
            )
        iterator = iter(self.train_loader)
        for skipped in range(skip):
            try:
                next(iterator)
            except StopIteration:
                raise CheckpointError(
                    f"The checkpoint stopped after batch {skip} of epoch {self.epoch + 1}, but train_loader now "
                    f"yields only {skipped} batches: resume with the same data and batch size."
                ) from None
        restore_rng_state(now)  # the model's own draws (dropout) continue from the saved state
        log.info("Resumed inside epoch %d: skipped the %d batches already trained on.", self.epoch + 1, skip)
        return enumerate(iterator, start=skip)

    def _optimizer_step(self, loss: torch.Tensor, micro: int, batch_index: int = -1) -> bool:
        """Clip, check, step; returns False when the step was skipped as non-finite."""
        lr = self.current_lr()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        accumulate = self.config.gradient_accumulation_steps
        if micro < accumulate and grads:  # a short last window: average over the batches it really holds
            torch._foreach_mul_(grads, accumulate / micro)
        if self.config.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.config.grad_clip_value)
        grad_norm = None
        if self.config.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        elif self.scaler is None and grads:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(loss)
        if grad_norm is not None and self.scaler is None:
            finite &= torch.isfinite(grad_norm)
        if self.world_size > 1:  # skip together, and stop together on a signal any process received
            received = torch.tensor(float(self._signal_received or 0), device=self.device)
            flags = torch.stack([(~finite).float(), received])
            distributed.all_reduce_(flags, "max")
            finite = flags[0] == 0
            if flags[1].item() > 0:
                self._stop_signal = int(flags[1].item())
        applied = bool(finite)  # the one host sync per optimizer step
        if applied:
            # Under fp16 the GradScaler itself may skip the step (gradient overflow): same accounting.
            applied = self._apply_optimizer_step()
            if applied:
                self.nonfinite["in_a_row"] = 0
            else:
                self._skip_nonfinite_step(loss, grad_norm, batch_index, update_scaler=False)
        else:
            self._skip_nonfinite_step(loss, grad_norm, batch_index)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and self.config.scheduler_interval == "step" and not self._is_plateau:
            self.scheduler.step()
        if self.global_step % self.config.log_interval == 0:
            step_metrics = {"train/loss_step": loss.item(), "lr_step": lr}
            if grad_norm is not None:
                step_metrics["train/grad_norm_step"] = grad_norm.item()
            self._log(step_metrics)
        self._call("on_optimizer_step")
        return applied

    def _apply_optimizer_step(self) -> bool:
        """Step (with warmup scaling); False when the GradScaler skipped it for overflowing gradients."""
        applied = True
        factor = self.warmup.factor(self.global_step) if self.warmup is not None else 1.0
        if factor != 1.0:
            scheduled = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * factor
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # the scale drops exactly when the step was skipped
        else:
            self.optimizer.step()
        if factor != 1.0:
            for group, lr in zip(self.optimizer.param_groups, scheduled):
                group["lr"] = lr
        if self.ema is not None and applied:
            self.ema.update(self.model)
        return applied

    def _skip_nonfinite_step(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None, batch_index: int, update_scaler: bool = True
    ) -> None:
        self.nonfinite["in_a_row"] += 1
        self.nonfinite["total"] += 1
        if self.scaler is not None and update_scaler:
            self.scaler.update()
        what = f"loss={loss.item()}" + (f", grad_norm={grad_norm.item()}" if grad_norm is not None else "")
        log.warning(
            "Skipped optimizer step %d (epoch %d, batch %d): non-finite %s (%d in a row, %d in total).",
            self.global_step + 1,
            self.epoch + 1,
            batch_index + 1,
            what,
            self.nonfinite["in_a_row"],
            self.nonfinite["total"],
        )
        self._log({"train/nonfinite_steps": float(self.nonfinite["total"])})
        if self.nonfinite["in_a_row"] >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite['in_a_row']} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {self.global_step + 1}, epoch {self.epoch + 1}, batch {batch_index + 1}; "
                f"max_nonfinite_steps={self.config.max_nonfinite_steps}). Lower the learning rate, enable "
                "grad_clip, or check the data."
            )

    def validate(self, loader: Iterable[Any], prefix: str = "val") -> dict[str, float]:
        """Sample-weighted mean loss terms over ``loader``, named ``{prefix}/{term}``.

        Uses the EMA weights when EMA is on. Autograd stays enabled (models may differentiate
        inside ``forward``), but parameters are frozen so no graph is built for them.
        """
        was_training = self.model.training
        self.model.eval()
        sums = MetricSums()
        samples = 0
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        ema = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
        try:
            for p in frozen:
                p.requires_grad_(False)
            with ema:
                for batch in loader:
                    batch = move_to_device(batch, self.device)
                    n = self.batch_size_fn(batch)
                    with self._autocast():
                        terms = self._loss_terms(batch)
                    sums.add(_detach(terms), n)
                    samples += n
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)
        sums, samples, _ = self._reduce_sums(sums, samples)
        if samples == 0:
            raise RuntimeError(f"The {prefix} loader yielded no batches.")
        return sums.compute(prefix=f"{prefix}/")

    evaluate = validate

    # ------------------------------------------------------------------ loss
    @property
    def forward_module(self) -> nn.Module:
        """The module a loss calls: the DistributedDataParallel wrapper while training under torchrun
        (so that gradients are averaged), the model itself otherwise."""
        return self._ddp if self._ddp is not None and self.model.training else self.model

    def compute_loss(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss for one batch; override in a subclass (calling ``self.forward_module``), or pass ``loss_fn``."""
        if self.loss_fn is not None:
            return self.loss_fn(self.forward_module, batch)
        return mse_loss(self.forward_module, batch)

    def _loss_terms(self, batch: Any) -> dict[str, Any]:
        out = self.compute_loss(batch)
        if isinstance(out, torch.Tensor):
            return {"loss": out}
        if isinstance(out, Mapping) and "loss" in out:
            return {
                k: v if isinstance(v, (torch.Tensor, Mean)) else torch.as_tensor(v, device=self.device)
                for k, v in out.items()
            }
        raise TypeError(
            f"The loss must be a Tensor or a dict with a 'loss' entry; got {type(out).__name__}"
            + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else "")
            + "."
        )

    # ------------------------------------------------------------------ monitor, schedulers
    @property
    def _is_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)

    def current_lr(self) -> float:
        """Learning rate of the first parameter group, warmup included."""
        factor = self.warmup.factor(self.global_step) if self.warmup is not None else 1.0
        return float(self.optimizer.param_groups[0]["lr"]) * factor

    def _better(self, value: float, reference: float | None, min_delta: float = 0.0) -> bool:
        if reference is None:
            return math.isfinite(value)
        if self.config.mode == "min":
            return value < reference - min_delta
        return value > reference + min_delta

    def _track_monitor(self, metrics: dict[str, float]) -> bool:
        """Update best-model and early-stopping state; True when the monitored metric improved."""
        if self.monitor not in metrics:
            validated = any(k.startswith("val/") for k in metrics)
            if self.monitor.startswith("val/") and not validated:
                return False
            raise ConfigError(
                f"monitor={self.monitor!r} is not a logged metric; available metrics are "
                f"{sorted(k for k in metrics if '/' in k)}."
            )
        value = metrics[self.monitor]
        improved = self._better(value, self.best_metric)
        if improved:
            self.best_metric, self.best_epoch = value, self.epoch
        patience = self.config.early_stopping_patience
        if self._better(value, self.early_stopping["best"], self.config.early_stopping_min_delta):
            self.early_stopping = {"best": value, "wait": 0}
        else:
            self.early_stopping["wait"] += 1
            if patience is not None and self.early_stopping["wait"] >= patience:
                log.info(
                    "Early stopping after epoch %d: %s has not improved by more than %g for %d validations "
                    "(best %.6g at epoch %s).",
                    self.epoch,
                    self.monitor,
                    self.config.early_stopping_min_delta,
                    self.early_stopping["wait"],
                    self.best_metric,
                    self.best_epoch,
                )
                self.should_stop = True
        return improved

    def _step_scheduler_after_epoch(self, monitored: float | None) -> None:
        if self.scheduler is None:
            return
        if self._is_plateau:
            if monitored is not None:
                self.scheduler.step(monitored)
        elif self.config.scheduler_interval == "epoch":
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state as plain data (loadable with ``torch.load(weights_only=True)``)."""
        loader_generator = getattr(self.train_loader, "generator", None)
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": type(self.optimizer).__name__,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scheduler_class": type(self.scheduler).__name__ if self.scheduler is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "monitor": self.monitor,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "early_stopping": dict(self.early_stopping),
            "nonfinite": dict(self.nonfinite),
            "history": {k: list(v) for k, v in self.history.items()},
            "rng": capture_rng_state(),
            "loader_generator": loader_generator.get_state() if isinstance(loader_generator, torch.Generator) else None,
            "config": self.config.to_dict(),
            "config_fingerprint": config_fingerprint(self.config.to_dict(), RESUMABLE_CHANGES),
            "epoch_progress": _progress_state(self.epoch_progress),
            "world_size": self.world_size,
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
        }
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "<state>", strict_config: bool = True) -> None:
        """Restore everything :meth:`state_dict` saved, so that ``fit()`` continues the run."""
        self._check_resume_config(state["config"], source, strict_config)
        load_model_state(self.model, state["model"], source)
        if state["optimizer_class"] != type(self.optimizer).__name__:
            raise CheckpointError(
                f"Checkpoint {source!r} holds a {state['optimizer_class']} state but the "
                f"Trainer uses {type(self.optimizer).__name__}."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler_class"] or None) != (type(self.scheduler).__name__ if self.scheduler else None):
            raise CheckpointError(
                f"Checkpoint {source!r} holds scheduler {state['scheduler_class']} but the "
                f"Trainer uses {type(self.scheduler).__name__ if self.scheduler else None}."
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self._extend_cosine_horizon(state["config"])
        if self.scaler is not None and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if not state["ema"]:
                raise CheckpointError(f"Checkpoint {source!r} has no EMA state but ema_decay is set.")
            self.ema.load_state_dict(state["ema"])
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.monitor = state["monitor"]
        self.best_metric = state["best_metric"]
        self.best_epoch = state["best_epoch"]
        self.early_stopping = dict(state["early_stopping"])
        self.nonfinite = dict(state["nonfinite"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        restore_rng_state(state["rng"])
        loader_generator = getattr(self.train_loader, "generator", None)
        if state["loader_generator"] is not None and isinstance(loader_generator, torch.Generator):
            loader_generator.set_state(state["loader_generator"])
        for name, cb_state in state["callbacks"].items():
            if name in self.callbacks:
                self.callbacks[name].load_state_dict(cb_state)
        self.epoch_progress = _progress_from_state(state.get("epoch_progress"), self.device)
        saved_world = state.get("world_size", 1)
        if self.epoch_progress is not None and saved_world != self.world_size:
            raise CheckpointError(
                f"Checkpoint {source!r} stopped inside an epoch of a {saved_world}-process run; its position "
                f"counts that run's batches, so resume it with {saved_world} process(es), not {self.world_size} "
                "(or resume from an epoch-end checkpoint such as previous.pt or epoch_NNNN.pt)."
            )
        if self.epoch_progress is not None and not self.is_main_process:
            # The saved partial sums are already totals over all processes; count them once.
            self.epoch_progress = {**self.epoch_progress, "sums": MetricSums(), "samples": 0, "processed": 0}
        self.resumed_from = source
        self._call("on_load_checkpoint", state)

    def save_checkpoint(self, path: str | Path, links: Sequence[Path] = ()) -> Path:
        """Write the training state to ``path`` atomically (refused if a weight is not finite); ``links``
        become copies of it (hard links) before ``path`` itself appears."""
        state = self.state_dict()
        self._call("on_save_checkpoint", state)
        _check_finite_weights(state, Path(path))
        return save_checkpoint(state, path, links=links)

    def _write_checkpoints(self, best: bool, epoch_end: bool) -> Path:
        """Write ``last.pt`` (the old one becomes ``previous.pt``) and link ``best_model.pt`` and
        ``epoch_NNNN.pt`` to it; an old epoch file goes only after its successor is complete."""
        assert self.checkpoint_dir is not None
        if self.world_size > 1:
            self._write_checkpoints_distributed(best, epoch_end)
        else:
            self._write_checkpoint_files(best, epoch_end)
        return self.checkpoint_dir / LAST

    def _write_checkpoint_files(self, best: bool, epoch_end: bool) -> None:
        assert self.checkpoint_dir is not None
        last = self.checkpoint_dir / LAST
        if last.is_file():
            link_checkpoint(last, self.checkpoint_dir / PREVIOUS)
        # best_model.pt and epoch_NNNN.pt get the new state before last.pt does: a kill in between
        # leaves last.pt older than them, and the resumed run redoes (and relinks) that epoch.
        links = [self.checkpoint_dir / BEST] if best else []
        if epoch_end and self.config.keep_last > 0:
            links.append(self.checkpoint_dir / f"epoch_{self.epoch:04d}.pt")
        self.save_checkpoint(last, links=links)
        if epoch_end and self.config.keep_last > 0:
            for old in epoch_checkpoints(self.checkpoint_dir)[: -self.config.keep_last]:
                old.unlink(missing_ok=True)

    def _write_checkpoints_distributed(self, best: bool, epoch_end: bool) -> None:
        # Every process takes part (the epoch's partial sums are reduced, the weights checked); rank 0
        # writes; the others wait, so none reads a checkpoint that is still being written.
        local = self.epoch_progress
        if local is not None:
            sums, samples, processed = self._reduce_sums(local["sums"], local["samples"], local["processed"])
            self.epoch_progress = {**local, "sums": sums, "samples": samples, "processed": processed}
        failure: Exception | None = None
        try:
            ema = self.ema.state_dict() if self.ema is not None else None
            _check_finite_weights({"model": self.model.state_dict(), "ema": ema}, self.checkpoint_dir / LAST)
            if self.is_main_process:
                try:
                    self._write_checkpoint_files(best, epoch_end)
                except (CheckpointError, OSError) as error:
                    failure = error
        finally:
            self.epoch_progress = local
        # Every process learns whether rank 0's write failed, and stops with it.
        failed = distributed.all_reduce_(torch.tensor(float(failure is not None), device=self.device), "max")
        if failure is not None:
            raise failure
        if failed.item() > 0:
            raise CheckpointError("Rank 0 could not write the checkpoint (see its log); stopping with it.")

    def load_checkpoint(self, path: str | Path, strict_config: bool = True) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; ``fit()`` then continues from it.

        ``path`` is a checkpoint file, or a checkpoint (or run) directory: then its newest readable
        checkpoint is used, falling back past unreadable files with a warning. With
        ``strict_config`` a checkpoint whose config differs in a field that changes the
        optimisation (anything but max_epochs, intervals, paths, patience) is refused.
        """
        path, state = read_checkpoint(path, map_location=self.device)
        self.load_state_dict(state, source=str(path), strict_config=strict_config)
        where = (
            f"epoch {self.epoch + 1}, batch {self.epoch_progress['batches']}"
            if self.epoch_progress
            else (f"the end of epoch {self.epoch}")
        )
        log.info("Resumed from %s at %s (step %d).", path, where, self.global_step)
        return state

    def _check_resume_config(self, saved: dict[str, Any], source: str, strict: bool) -> None:
        current = self.config.to_dict()
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
        ]
        if diffs and strict:
            raise CheckpointError(
                f"Checkpoint {source!r} was written with a different training config (fingerprint "
                f"{config_fingerprint(saved, RESUMABLE_CHANGES)}, now "
                f"{config_fingerprint(current, RESUMABLE_CHANGES)}: "
                + "; ".join(diffs)
                + "). Resume with the same config, or pass strict_config=False to accept the change."
            )
        if diffs:
            log.warning(
                "Resuming %s with a changed config: %s. The optimizer and scheduler continue from the "
                "checkpoint's state (its learning rates included).",
                source,
                "; ".join(diffs),
            )

    def _extend_cosine_horizon(self, saved_config: dict[str, Any]) -> None:
        # A cosine schedule sized to the original run is stretched to a raised max_epochs, so the
        # learning rate keeps decaying to its minimum instead of rising again after T_max.
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            return
        per_interval = self.steps_per_epoch if self.config.scheduler_interval == "step" else 1
        if per_interval and self.scheduler.T_max == saved_config["max_epochs"] * per_interval:
            self.scheduler.T_max = max(self.scheduler.T_max, self.config.max_epochs * per_interval)

    def _check_checkpoint_dir(self) -> None:
        if self.checkpoint_dir is None:
            return
        removed = remove_stale_temporaries(self.checkpoint_dir) if self.is_main_process else []
        if removed:
            log.warning("Removed %d unfinished checkpoint write(s) of a killed run: %s", len(removed), removed)
        # A resumed run, or this trainer training further (its own files), may write here.
        if self.resumed_from is not None or self.global_step > 0 or self.config.overwrite_checkpoints:
            return
        existing = [
            p.name
            for p in (self.checkpoint_dir / LAST, self.checkpoint_dir / PREVIOUS, self.checkpoint_dir / BEST)
            if p.exists()
        ] + [p.name for p in epoch_checkpoints(self.checkpoint_dir)]
        if existing:
            raise ConfigError(
                f"checkpoint_dir={str(self.checkpoint_dir)!r} already holds {existing} from another run. "
                "Resume it with trainer.load_checkpoint(path) before fit(), choose another checkpoint_dir, "
                "or set overwrite_checkpoints=True."
            )

    # ------------------------------------------------------------------ preemption, exclusive use
    @contextlib.contextmanager
    def _preemption_signals(self) -> Iterator[None]:
        """While ``fit()`` runs, SIGTERM/SIGINT only raise a flag that the loop checks after each
        optimizer step; a second SIGINT raises KeyboardInterrupt at once, a second SIGTERM kills."""
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        # torchrun forwards the terminal's Ctrl-C, so each worker gets it twice within milliseconds.
        debounce_s = 2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        first = {"time": 0.0}

        def handler(signum: int, frame: Any) -> None:
            if self._signal_received is not None:
                if signum == self._signal_received and time.monotonic() - first["time"] < debounce_s:
                    return
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            first["time"] = time.monotonic()
            self._signal_received = signum

        self._signal_received = self._stop_signal = None
        # A signal the process was told to ignore (nohup, a background job) stays ignored.
        handled = [sig for sig in PREEMPTION_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
        self._previous_handlers = {sig: signal.signal(sig, handler) for sig in handled}
        try:
            yield
        finally:
            for sig, old in self._previous_handlers.items():
                signal.signal(sig, old)
            self._previous_handlers = {}

    def _stop_on_signal(self, where: str) -> None:
        signum = self._stop_signal
        assert signum is not None
        name = signal.Signals(signum).name
        path = None
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / LAST
            if self.epoch_progress is not None:  # at an epoch end last.pt is already current
                path = self._write_checkpoints(best=False, epoch_end=False)
        message = f"{name} received: stopped {where} (global step {self.global_step}); " + (
            f"the training state is in {path}, resume from it." if path else "no checkpoint_dir, nothing saved."
        )
        log.warning(message)
        previous = self._previous_handlers.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            # Another tool's handler (e.g. submitit's, which requeues a SLURM job) runs after the save.
            previous(signum, None)
        raise TrainingInterrupted(signum, path, message)

    @contextlib.contextmanager
    def _checkpoint_dir_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on ``checkpoint_dir`` so that two live runs never write into it."""
        if self.checkpoint_dir is None or not self.is_main_process:
            yield
            return
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            yield
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.checkpoint_dir / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                # lockf (a POSIX record lock), not flock: forked DataLoader workers do not inherit it.
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise ConfigError(
                    f"checkpoint_dir={str(self.checkpoint_dir)!r} is in use by another running training "
                    f"process (pid {owner}); two runs must not share a checkpoint directory. Choose another "
                    "checkpoint_dir, or wait for that run to end."
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ helpers
    def _record(self, metrics: dict[str, float]) -> None:
        epochs = len(self.history.get("epoch", []))
        for name in metrics:
            self.history.setdefault(name, [math.nan] * epochs)
        for name, values in self.history.items():
            values.append(float(metrics.get(name, math.nan)))
        self._log(metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, self.global_step)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks.values():
            getattr(callback, hook)(self, *args)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mixed_precision == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _check_precision(self) -> None:
        mp = self.config.mixed_precision
        if mp == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                f"mixed_precision='fp16' is invalid on device {str(self.device)!r}: fp16 needs "
                "CUDA; accepted here: 'off' or 'bf16'."
            )
        if mp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"mixed_precision='bf16' is not supported by {torch.cuda.get_device_name(self.device)}; "
                "accepted: 'off' or 'fp16'."
            )

    def _warn_on_batch_size_mismatch(self) -> None:
        loader_batch = getattr(self.train_loader, "batch_size", None)
        if isinstance(loader_batch, int) and loader_batch != self.config.batch_size:
            log.warning(
                "train_loader.batch_size=%d differs from config.batch_size=%d; the loader's value is used.",
                loader_batch,
                self.config.batch_size,
            )


# ---------------------------------------------------------------------- free functions
def mse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: mean squared error of ``model(inputs)`` against ``targets``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"The default loss expects batches of (inputs, targets); got {type(batch).__name__}{length}. "
            "Pass loss_fn=f(model, batch) or override Trainer.compute_loss."
        )
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available else CPU; a CUDA request without CUDA is a ConfigError."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r} is invalid: accepted are 'auto', 'cpu', 'cuda', 'cuda:N'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} is invalid here: CUDA is not available; accepted: 'cpu' or 'auto'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported; accepted are 'auto', 'cpu', 'cuda', 'cuda:N'.")
    return resolved


def seed_everything(seed: int, loader: Any = None) -> None:
    """Seed python, numpy and torch RNGs (and the loader's own generator, if it has one)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor (and every object with ``.to``) inside nested dicts, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if hasattr(batch, "to"):  # a batch class of its own (e.g. atomistic batches)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def infer_batch_size(batch: Any) -> int:
    """Samples in ``batch``: ``len(batch)`` for a batch class of its own (e.g. structures in an
    atomistic batch), else the leading dimension of the first tensor inside (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if not isinstance(batch, (dict, list, tuple, str, bytes)) and hasattr(batch, "__len__"):
        return len(batch)
    values: Iterable[Any] = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    )
    for value in values:
        if isinstance(value, (torch.Tensor, dict, list, tuple)) or (
            hasattr(value, "__len__") and not isinstance(value, (str, bytes))
        ):
            return infer_batch_size(value)
    return 1


def _check_finite_weights(state: dict[str, Any], path: Path) -> None:
    tensors = dict(state["model"])
    if state.get("ema"):
        tensors.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    floats = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
        return
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    raise CheckpointError(
        f"Refusing to write checkpoint {str(path)!r}: non-finite values in {bad[:5]}"
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        + ". The previous checkpoint is kept; lower the learning rate or enable grad_clip."
    )


def _detach(terms: dict[str, Any]) -> dict[str, Any]:
    """Terms without their graphs, in float32 at least (callbacks and sums never see half precision)."""

    def upcast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    return {k: type(v)(*map(upcast, v)) if isinstance(v, Mean) else v.detach().float() for k, v in terms.items()}


def _progress_state(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """The epoch position as plain data (its metric sums as a state dict)."""
    if progress is None:
        return None
    return {**progress, "sums": progress["sums"].state_dict()}


def _progress_from_state(state: dict[str, Any] | None, device: torch.device) -> dict[str, Any] | None:
    if state is None:
        return None
    sums = state["sums"]
    if "roots" in sums:
        metric_sums = MetricSums.from_state_dict(sums, device)
    else:  # format 2 before exact metrics: sample-weighted sums of per-sample means
        metric_sums = MetricSums()
        for name, weighted in sums.items():
            metric_sums.sums[name] = torch.tensor(
                [float(weighted), float(state["samples"])], dtype=torch.float64, device=device
            )
    return {**state, "sums": metric_sums}


def _name_callbacks(callbacks: Sequence[Callback] | Mapping[str, Callback] | None) -> dict[str, Callback]:
    if callbacks is None:
        return {}
    if isinstance(callbacks, Mapping):
        return dict(callbacks)
    named: dict[str, Callback] = {}
    for callback in callbacks:
        name = type(callback).__name__
        index = 1
        while name in named:
            index += 1
            name = f"{type(callback).__name__}_{index}"
        named[name] = callback
    return named


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _steps_per_epoch(loader: Any, accumulate: int) -> int | None:
    batches = _safe_len(loader)
    return None if batches is None else math.ceil(batches / accumulate)
