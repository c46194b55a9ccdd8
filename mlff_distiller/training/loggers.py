"""Metric loggers: a small interface with TensorBoard and rich-console implementations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batches import safe_len
from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer


class Logger(Callback):
    """Receives scalar metrics keyed by name at a global step. Loggers are also callbacks."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's configuration once, at the start of ``fit()``."""

    def close(self) -> None:
        """Flush and release resources."""


class TensorBoardLogger(Logger):
    """Writes TensorBoard event files to ``log_dir`` (tensorboard is imported on first use)."""

    def __init__(self, log_dir: str | Path, flush_secs: int = 30) -> None:
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer: Any = None
        self._purge_step: int | None = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.log_dir), flush_secs=self.flush_secs, purge_step=self._purge_step
            )
        return self._writer

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        # Points a killed run logged after its last checkpoint are logged again by the resumed run;
        # TensorBoard drops the stale ones when both write into the same directory.
        self._purge_step = int(checkpoint["global_step"]) + 1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        lines = "\n".join(f"    {key}: {value}" for key, value in sorted(config.items()))
        self.writer.add_text("config", lines, global_step=0)

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ConsoleLogger(Logger):
    """A rich progress bar over each epoch's batches and, optionally, one compact row per epoch.

    A row holds the epoch, ``metrics`` (those present), the monitored metric (``*``: it improved, a new
    best model), the learning rate and the epoch's wall time; every metric stays in the other loggers,
    the history and the log file.
    """

    def __init__(
        self, progress_bar: bool = True, print_epochs: bool = True, metrics: Sequence[str] = ("train/loss", "val/loss")
    ) -> None:
        self.progress_bar = progress_bar
        self.print_epochs = print_epochs
        self.metrics = tuple(metrics)
        self._progress: Any = None
        self._task: Any = None
        self._header_shown = False
        from rich.console import Console

        self.console = Console(stderr=True)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._header_shown = False

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if not self.progress_bar or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=self.console,
            transient=True,
        )
        total = safe_len(trainer.train_loader)
        self._task = self._progress.add_task("train", total=total, epoch=trainer.epoch + 1, loss="")
        self._progress.start()

    def on_train_batch_end(self, trainer: Trainer, batch_index: int, terms: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._progress is not None and "train/loss_step" in metrics:
            self._progress.update(self._task, loss=f"loss {metrics['train/loss_step']:.4g}")

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._stop_progress()
        if not self.print_epochs:
            return
        names = [*dict.fromkeys([*self.metrics, trainer.monitor]), "lr"]
        widths = [max(len(name), 10) for name in names]
        if not self._header_shown:
            self._header_shown = True
            header = "  ".join(name.ljust(width) for name, width in zip(names, widths))
            self.console.print(
                f"{'epoch':<9}  {header}  time   (* new best {trainer.monitor})", highlight=False, soft_wrap=True
            )
        cells = []
        for name, width in zip(names, widths):
            cell = _fmt(metrics[name]) if name in metrics else "-"
            if name == trainer.monitor and trainer.best_epoch == trainer.epoch and name in metrics:
                cell += " *"
            cells.append(cell.ljust(width))
        epoch = f"{trainer.epoch}/{trainer.config.max_epochs}"
        time_s = _fmt(metrics.get("epoch_time_s", math.nan))
        self.console.print(f"{epoch:<9}  {'  '.join(cells)}  {time_s} s", highlight=False, soft_wrap=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._stop_progress()

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
