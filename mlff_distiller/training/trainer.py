"""The training loop: a plain-PyTorch `Trainer` whose `fit()` reads top to bottom.

``fit() -> _run_epoch() -> train_epoch() -> _optimizer_step()``, then ``validate()``. The rest lives in a
module per concern: optimizer and scheduler factories (:mod:`.optim`), checkpoint files and the run's
directory (:mod:`.checkpoint`), the position inside an epoch (:mod:`.progress`), stop signals
(:mod:`.signals`), agreement between processes (:mod:`.distributed`), RNG streams (:mod:`.rng`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from time import monotonic  # the budget's clock (a module-level name, so that tests can replace it)
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .batches import infer_batch_size, move_to_device, safe_len
from .callbacks import has_hooks, named_callbacks
from .checkpoint import (
    FORMAT_VERSION,
    LAST,
    CheckpointDir,
    CheckpointError,
    check_finite_weights,
    check_resume_config,
    config_fingerprint,
    load_model_state,
    load_model_weights,
    read_checkpoint,
    save_checkpoint,
)
from .config import RESUMABLE_CHANGES, ConfigError, TrainingConfig
from .ema import ExponentialMovingAverage
from .loggers import ConsoleLogger, Logger
from .metrics import MetricSums, detached, loss_terms
from .monitor import Monitor, monitored_metric
from .optim import OptimizerFactory, Schedule, Scheduler, SchedulerFactory, Warmup, build_optimizer
from .progress import EpochProgress
from .rng import capture_rng_state, loader_generator, restore_rng_state, seed_everything
from .signals import PreemptionSignals, TrainingInterrupted

log = logging.getLogger(__name__)
# Every metric of every epoch, one line each: for the log file (mlff-train keeps it off the console).
epoch_log = logging.getLogger(f"{__name__}.epochs")

LossFn = Callable[[nn.Module, Any], "torch.Tensor | dict[str, torch.Tensor]"]


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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
            MSE of ``model(inputs)`` against ``targets`` for ``(inputs, targets)`` batches. A loss_fn that
            defines callback hooks (e.g. ``on_optimizer_step``) receives them.
        optimizer: an optimizer, or a factory ``params -> optimizer`` (e.g. a Hydra partial); it wins
            over ``config.optimizer``, whose name is otherwise turned into such a factory.
        lr_scheduler: a scheduler, or a factory ``optimizer -> scheduler``; it wins over
            ``config.lr_scheduler``. The Trainer sets a factory's horizon (``T_max`` of a cosine) to the
            length of the run. ``ReduceLROnPlateau`` steps on the monitored metric after each epoch,
            others every ``config.scheduler_interval``.
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
        callbacks: Sequence[Any] | Mapping[str, Any] | None = None,
        loggers: Sequence[Logger] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        self.config = config = TrainingConfig.coerce(config)
        self.device = distributed.resolve_device(device if device is not None else config.device)
        distributed.check_precision(config.mixed_precision, self.device)
        self.model = model.to(self.device)
        # Under torchrun: gradients are averaged by DistributedDataParallel; rank 0 writes all files.
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main_process = self.rank == 0
        self._ddp = distributed.data_parallel(self.model, self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.batch_size_fn = batch_size_fn or infer_batch_size
        name = monitored_metric(config.monitor, has_validation=val_loader is not None)
        self.monitored = Monitor(name, config.mode, config.early_stopping_patience, config.early_stopping_min_delta)
        self._warn_on_batch_size_mismatch()
        batches = safe_len(train_loader)
        self.steps_per_epoch = None if batches is None else math.ceil(batches / config.gradient_accumulation_steps)
        if self.world_size > 1 and self.steps_per_epoch is None:
            raise ConfigError(
                "Under torchrun the train_loader needs a length (each process must know which micro-batch "
                "ends an accumulation window); got a loader without __len__."
            )

        # One path for both: an argument if given, else the config's name turned into the same kind of factory.
        self.optimizer = build_optimizer(optimizer, config, self.model)
        self.schedule = Schedule(lr_scheduler, self.optimizer, config, self.steps_per_epoch)
        self.scheduler = self.schedule.scheduler
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
        self.callbacks: dict[str, Any] = named_callbacks(callbacks)
        for logger in self.loggers:
            self.callbacks.setdefault(f"logger/{type(logger).__name__}", logger)
        if has_hooks(loss_fn):
            self.callbacks.setdefault("loss_fn", loss_fn)

        self.checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        # The run's state (saved by state_dict): where it stands, what it found best, what it has spent.
        self.epoch = 0
        self.global_step = 0
        self.elapsed_s = 0.0
        """Wall time spent in ``fit()`` by this run and those it resumed (as agreed at the last step)."""
        self.nonfinite = {"in_a_row": 0, "total": 0}
        self.history: dict[str, list[float]] = {}
        self.epoch_progress: EpochProgress | None = None
        """Position inside the running epoch (None between epochs); saved so that a run resumes mid-epoch."""
        self.should_stop = False
        self.resumed_from: str | None = None
        self._signals = PreemptionSignals()
        self._fit_started = 0.0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, list[float]]:
        """Train until ``max_epochs``, the ``max_time`` budget or early stopping; returns the per-epoch history.

        ``history[name][i]`` is metric ``name`` after epoch ``history["epoch"][i]``; metrics not
        computed in an epoch (validation between ``val_interval``s) are NaN there.
        """
        directory = CheckpointDir(self.checkpoint_dir, self.config.keep_last) if self.checkpoint_dir else None
        if not self.is_main_process:
            directory = None  # rank 0 alone touches the files
        with (
            directory.locked() if directory else contextlib.nullcontext(),
            self._signals.installed(self.config.handle_signals),
        ):
            if directory is not None:
                directory.prepare(self._continues_a_run() or self.config.overwrite_checkpoints, self.resumed_from)
            if not self._continues_a_run() and self.config.seed is not None:
                seed_everything(self.config.seed, self.train_loader)
            if self.config.keep_freed_memory:
                from ..memory import keep_freed_memory

                keep_freed_memory()
            for logger in self.loggers:
                logger.log_config(self.config.to_dict())
            self._fit_started = monotonic() - self.elapsed_s  # the budget counts resumed runs' time too
            self.should_stop = False
            self._agree_on_stop()  # a resumed run may find its budget already spent
            self._call("on_fit_start")
            try:
                while self.epoch < self.config.max_epochs and not self.should_stop:
                    self._run_epoch()
                    signum = self._agree_on_stop()
                    if signum is not None:
                        self._stop_on_signal(signum, f"after epoch {self.epoch}")
            finally:
                self._call("on_fit_end")
                for logger in self.loggers:
                    logger.close()
        return self.history

    def _run_epoch(self) -> None:
        """Train one epoch, validate when due, then track the monitored metric, log and save."""
        start = time.perf_counter()
        lr = self.epoch_progress.lr if self.epoch_progress is not None else self.current_lr()
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

        improved, early_stop = self.monitored.update(metrics, self.epoch)
        self.should_stop = self.should_stop or early_stop
        self.schedule.step("epoch", self.elapsed_s, metrics.get(self.monitor))
        self._call("on_train_epoch_end", metrics)
        self._record(metrics)
        if self.checkpoint_dir is not None:
            self._write_checkpoints(best=improved, epoch_end=True)

    def train_epoch(self) -> tuple[dict[str, float], int, float]:
        """One pass over ``train_loader`` (or the rest of it, after a mid-epoch resume).

        Returns the loss terms (exact means over the epoch, see :mod:`.metrics`), the number of samples
        and the training time in s.
        """
        start = time.perf_counter()
        self.model.train()
        if self.epoch_progress is None:
            self.epoch_progress = EpochProgress.start(self.train_loader, self.current_lr())
        progress = self.epoch_progress
        self._call("on_train_epoch_start")
        accumulate = self.config.gradient_accumulation_steps
        num_batches = safe_len(self.train_loader)
        window, window_samples, micro = MetricSums(), 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for batch_index, batch in progress.batches_of(self.train_loader, self.epoch):
            batch = move_to_device(batch, self.device)
            n = self.batch_size_fn(batch)
            ends_window = micro + 1 == accumulate or batch_index + 1 == num_batches
            terms = self._forward_backward(batch, ends_window)
            window.add(terms, n)
            window_samples += n
            micro += 1
            self._call("on_train_batch_end", batch_index, terms)
            if not ends_window:  # a loader without a length ends inside its last window: stepped below
                continue
            applied = self._optimizer_step(window.mean("loss"), micro, batch_index)
            progress.add_window(window, window_samples, applied)
            progress.batches = batch_index + 1
            window, window_samples, micro = MetricSums(), 0, 0
            # The one place per step where all processes agree whether to stop; acted on right below.
            signum = self._agree_on_stop()
            self.schedule.step("step", self.elapsed_s)
            if signum is not None:
                progress.elapsed_s += time.perf_counter() - start
                self._stop_on_signal(signum, f"in epoch {self.epoch + 1} after batch {batch_index + 1}")
            if self.should_stop:
                break
            every = self.config.checkpoint_every_n_steps
            if every and self.global_step % every == 0 and batch_index + 1 != num_batches and self.checkpoint_dir:
                progress.elapsed_s += time.perf_counter() - start
                start = time.perf_counter()
                self._write_checkpoints(best=False, epoch_end=False)
        if micro:
            applied = self._optimizer_step(window.mean("loss"), micro, progress.batches + micro - 1)
            progress.add_window(window, window_samples, applied)
            progress.batches += micro
            self.schedule.step("step", self.elapsed_s)
        if progress.batches == 0:
            raise RuntimeError("train_loader yielded no batches.")
        self.epoch_progress = None
        elapsed = progress.elapsed_s + time.perf_counter() - start
        sums, (samples, processed) = distributed.reduce_metric_sums(
            progress.sums, [progress.samples, progress.processed], self.device
        )
        if samples == 0:  # every step of the epoch was skipped as non-finite
            return {"train/loss": math.nan}, processed, elapsed
        return sums.compute(prefix="train/"), processed, elapsed

    def _forward_backward(self, batch: Any, ends_window: bool) -> dict[str, Any]:
        """Loss terms of one micro-batch, whose gradient is added to ``.grad``; returns them detached."""
        # Gradients are averaged across processes only on the micro-batch that completes a window.
        sync = contextlib.nullcontext() if self._ddp is None or ends_window else self._ddp.no_sync()
        with sync:
            with self._autocast():
                terms = loss_terms(self.compute_loss(batch), self.device)
            scaled = terms["loss"] / self.config.gradient_accumulation_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return detached(terms)

    def _optimizer_step(self, loss: torch.Tensor, micro: int, batch_index: int) -> bool:
        """One optimizer step on the accumulated gradients: unscale, clip, check, step (warmup applied),
        update the EMA, count, log. A non-finite loss or gradient on any process skips the update on all
        of them; returns whether the step was applied."""
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
        if grad_norm is not None and self.scaler is None:  # under fp16 the GradScaler judges the gradients
            finite &= torch.isfinite(grad_norm)
        applied = bool(distributed.all_true(finite))  # the one host sync per optimizer step
        if applied:
            with self.warmup.applied(self.optimizer, self.global_step) if self.warmup else contextlib.nullcontext():
                if self.scaler is not None:
                    scale = self.scaler.get_scale()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    applied = self.scaler.get_scale() >= scale  # the scale drops exactly when it skipped (overflow)
                else:
                    self.optimizer.step()
        elif self.scaler is not None:
            self.scaler.update()
        if applied:
            self.nonfinite["in_a_row"] = 0
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self._count_nonfinite_step(loss, grad_norm, batch_index)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.global_step % self.config.log_interval == 0:
            step_metrics = {"train/loss_step": loss.item(), "lr_step": lr}
            if grad_norm is not None:
                step_metrics["train/grad_norm_step"] = grad_norm.item()
            self._log(step_metrics)
        self._call("on_optimizer_step")
        return applied

    def _count_nonfinite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, batch_index: int) -> None:
        self.nonfinite["in_a_row"] += 1
        self.nonfinite["total"] += 1
        what = f"loss={loss.item()}" + (f", grad_norm={grad_norm.item()}" if grad_norm is not None else "")
        step, epoch, batch = self.global_step + 1, self.epoch + 1, batch_index + 1
        log.warning(
            "Skipped optimizer step %d (epoch %d, batch %d): non-finite %s (%d in a row, %d in total).",
            step,
            epoch,
            batch,
            what,
            self.nonfinite["in_a_row"],
            self.nonfinite["total"],
        )
        self._log({"train/nonfinite_steps": float(self.nonfinite["total"])})
        if self.nonfinite["in_a_row"] >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite['in_a_row']} optimizer steps in a row had a non-finite loss or gradient (last at "
                f"step {step}, epoch {epoch}, batch {batch}; max_nonfinite_steps={self.config.max_nonfinite_steps}). "
                "Lower the learning rate, enable grad_clip, or check the data."
            )

    # ------------------------------------------------------------------ stopping
    def _agree_on_stop(self) -> int | None:
        """Whether to stop, agreed by all processes (one all-reduce): sets ``should_stop`` when any process
        asked for it (a callback, early stopping) or the ``max_time`` budget is spent, and returns the stop
        signal any of them received (None: none). Also agrees on ``elapsed_s``, which a time horizon follows."""
        received = float(self._signals.received or 0)
        signum, stop, self.elapsed_s = distributed.agree_max(
            [received, float(self.should_stop), monotonic() - self._fit_started], self.device
        )
        budget = self.config.max_time
        if not stop and budget is not None and self.elapsed_s >= budget:
            log.info(
                "max_time=%g s is spent (%.1f s, step %d): training stops.", budget, self.elapsed_s, self.global_step
            )
            stop = 1.0
        self.should_stop = stop > 0
        return int(signum) or None

    def _stop_on_signal(self, signum: int, where: str) -> None:
        """Save (mid-epoch: a last.pt that records the position), hand the signal over, raise."""
        path = None
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / LAST
            if self.epoch_progress is not None:  # at an epoch end last.pt is already current
                path = self._write_checkpoints(best=False, epoch_end=False)
        message = f"{signal.Signals(signum).name} received: stopped {where} (global step {self.global_step}); " + (
            f"the training state is in {path}, resume from it." if path else "no checkpoint_dir, nothing saved."
        )
        log.warning(message)
        self._signals.hand_over(signum)
        raise TrainingInterrupted(signum, path, message)

    # ------------------------------------------------------------------ evaluation
    def validate(self, loader: Iterable[Any], prefix: str = "val") -> dict[str, float]:
        """Exact mean loss terms over ``loader``, named ``{prefix}/{term}``, with the EMA weights when EMA is on."""
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            return self._evaluate(loader, prefix)

    evaluate = validate

    def evaluate_checkpoint(
        self, path: str | Path, loader: Iterable[Any], prefix: str = "test", use_ema: bool = True
    ) -> dict[str, float]:
        """Metrics of a checkpoint's weights (its EMA weights, when it kept them and ``use_ema``) on ``loader``.

        Only the weights are read; the training state (epoch, optimizer, best metric) and the model's own
        weights are left as they were.
        """
        own = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        load_model_weights(self.model, path, use_ema=use_ema)
        try:
            return self._evaluate(loader, prefix)
        finally:
            self.model.load_state_dict(own)

    def _evaluate(self, loader: Iterable[Any], prefix: str) -> dict[str, float]:
        # Autograd stays enabled (models may differentiate inside forward), but the parameters are
        # frozen so that no graph is built for them.
        was_training = self.model.training
        self.model.eval()
        sums = MetricSums()
        samples = 0
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            for batch in loader:
                batch = move_to_device(batch, self.device)
                n = self.batch_size_fn(batch)
                with self._autocast():
                    terms = loss_terms(self.compute_loss(batch), self.device)
                sums.add(detached(terms), n)
                samples += n
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)
        sums, (samples,) = distributed.reduce_metric_sums(sums, [samples], self.device)
        if samples == 0:
            raise RuntimeError(f"The {prefix} loader yielded no batches.")
        return sums.compute(prefix=f"{prefix}/")

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

    # ------------------------------------------------------------------ monitor, scheduler
    def current_lr(self) -> float:
        """Learning rate of the first parameter group, warmup included."""
        factor = self.warmup.factor(self.global_step) if self.warmup is not None else 1.0
        return float(self.optimizer.param_groups[0]["lr"]) * factor

    @property
    def monitor(self) -> str:
        """The monitored metric's name (best model, early stopping, plateau scheduler)."""
        return self.monitored.name

    @property
    def best_metric(self) -> float | None:
        return self.monitored.best

    @property
    def best_epoch(self) -> int | None:
        return self.monitored.best_epoch

    @property
    def early_stopping(self) -> dict[str, Any]:
        return self.monitored.early_stopping

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state as plain data (loadable with ``torch.load(weights_only=True)``)."""
        generator = loader_generator(self.train_loader)
        return {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "elapsed_s": self.elapsed_s,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": type(self.optimizer).__name__,
            **self.schedule.state_dict(),  # scheduler, scheduler_class, time_anchor
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            **self.monitored.state_dict(),  # monitor, best_metric, best_epoch, early_stopping
            "nonfinite": dict(self.nonfinite),
            "history": {k: list(v) for k, v in self.history.items()},
            "rng": capture_rng_state(),
            "loader_generator": generator.get_state() if generator is not None else None,
            "config": self.config.to_dict(),
            "config_fingerprint": config_fingerprint(self.config.to_dict(), RESUMABLE_CHANGES),
            "epoch_progress": self.epoch_progress.state_dict() if self.epoch_progress is not None else None,
            "world_size": self.world_size,
            "callbacks": {
                name: callback.state_dict()
                for name, callback in self.callbacks.items()
                if callable(getattr(callback, "state_dict", None))
            },
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "<state>", strict_config: bool = True) -> None:
        """Restore everything :meth:`state_dict` saved, so that ``fit()`` continues the run."""
        check_resume_config(state["config"], self.config.to_dict(), source, strict_config)
        load_model_state(self.model, state["model"], source)
        if state["optimizer_class"] != type(self.optimizer).__name__:
            raise CheckpointError(
                f"Checkpoint {source!r} holds a {state['optimizer_class']} state but the "
                f"Trainer uses {type(self.optimizer).__name__}."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if not state["ema"]:
                raise CheckpointError(f"Checkpoint {source!r} has no EMA state but ema_decay is set.")
            self.ema.load_state_dict(state["ema"])
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.schedule.load_state_dict(state, state["config"], self.elapsed_s, source)
        self.monitored.load_state_dict(state)
        self.nonfinite = dict(state["nonfinite"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        restore_rng_state(state["rng"])
        generator = loader_generator(self.train_loader)
        if state["loader_generator"] is not None and generator is not None:
            generator.set_state(state["loader_generator"].cpu())  # a CUDA map_location moved it
        for name, callback_state in state["callbacks"].items():
            if callable(getattr(self.callbacks.get(name), "load_state_dict", None)):
                self.callbacks[name].load_state_dict(callback_state)
        progress = state.get("epoch_progress")
        self.epoch_progress = EpochProgress.from_state_dict(progress, self.device) if progress else None
        saved_world = state.get("world_size", 1)
        if self.epoch_progress is not None and saved_world != self.world_size:
            raise CheckpointError(
                f"Checkpoint {source!r} stopped inside an epoch of a {saved_world}-process run; its position "
                f"counts that run's batches, so resume it with {saved_world} process(es), not {self.world_size} "
                "(or resume from an epoch-end checkpoint such as previous.pt or epoch_NNNN.pt)."
            )
        if self.epoch_progress is not None and not self.is_main_process:
            self.epoch_progress = self.epoch_progress.without_sums()
        self.resumed_from = source
        self._call("on_load_checkpoint", state)

    def load_checkpoint(self, path: str | Path, strict_config: bool = True) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; ``fit()`` then continues from it.

        ``path`` is a checkpoint file, or a checkpoint (or run) directory: then its newest readable
        checkpoint is used, falling back past unreadable files with a warning. With ``strict_config``
        a checkpoint whose config differs in a field outside ``RESUMABLE_CHANGES`` (anything but how
        long to train, where and how often to write, when to stop early) is refused.
        """
        path, state = read_checkpoint(path, map_location=self.device)
        self.load_state_dict(state, source=str(path), strict_config=strict_config)
        progress = self.epoch_progress
        where = f"epoch {self.epoch + 1}, batch {progress.batches}" if progress else f"the end of epoch {self.epoch}"
        log.info("Resumed from %s at %s (step %d).", path, where, self.global_step)
        return state

    def save_checkpoint(self, path: str | Path, links: Sequence[Path] = ()) -> Path:
        """Write the training state to ``path`` atomically (refused if a weight is not finite); ``links``
        become copies of it (hard links) before ``path`` itself appears."""
        state = self._checkpoint_state()
        check_finite_weights(state, path)
        return save_checkpoint(state, path, links=links)

    def _checkpoint_state(self) -> dict[str, Any]:
        state = self.state_dict()
        self._call("on_save_checkpoint", state)
        return state

    def _write_checkpoints(self, best: bool, epoch_end: bool) -> Path:
        """Save into ``checkpoint_dir`` (last.pt, previous.pt, best_model.pt, epoch_NNNN.pt). Under torchrun
        every process takes part (the epoch's partial sums are reduced, the weights checked), rank 0
        writes, and all stop if its write fails."""
        assert self.checkpoint_dir is not None
        directory = CheckpointDir(self.checkpoint_dir, self.config.keep_last)
        epoch = self.epoch if epoch_end else None
        if self.world_size == 1:
            return directory.write(self._checkpoint_state(), best, epoch)
        local = self.epoch_progress
        ema = self.ema.state_dict() if self.ema is not None else None
        check_finite_weights({"model": self.model.state_dict(), "ema": ema}, directory.path / LAST)
        try:
            if local is not None:  # what is saved are totals over all processes
                self.epoch_progress = local.reduced(self.device)
            failed = CheckpointError("Rank 0 could not write the checkpoint (see its log); stopping with it.")
            distributed.run_on_rank0(
                lambda: directory.write(self._checkpoint_state(), best, epoch), self.device, failed
            )
        finally:
            self.epoch_progress = local
        return directory.path / LAST

    def _continues_a_run(self) -> bool:
        """Whether fit() goes on with a run: a resumed one, or this trainer training further."""
        return self.resumed_from is not None or self.global_step > 0

    # ------------------------------------------------------------------ helpers
    def _record(self, metrics: dict[str, float]) -> None:
        epochs = len(self.history.get("epoch", []))
        for name in metrics:
            self.history.setdefault(name, [math.nan] * epochs)
        for name, values in self.history.items():
            values.append(float(metrics.get(name, math.nan)))
        self._log(metrics)
        if self.is_main_process:
            shown = ", ".join(f"{k} {v:.5g}" for k, v in metrics.items() if k != "epoch")
            epoch_log.info("epoch %d/%d: %s", self.epoch, self.config.max_epochs, shown)

    def _log(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, self.global_step)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks.values():
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mixed_precision == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
