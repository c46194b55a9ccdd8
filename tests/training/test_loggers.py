"""Metric loggers: TensorBoard event files, custom Logger subclasses, the rich console logger."""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_testkit import RecordingLogger, linear_model, loader, make_trainer, regression_data

from mlff_distiller.training import Callback, ConsoleLogger, TensorBoardLogger, Trainer, TrainingConfig


def _loaders(n_train=40, batch_size=8):
    x, y = regression_data(n=n_train, seed=0)
    xv, yv = regression_data(n=16, seed=1)
    return loader(x, y, batch_size), loader(xv, yv, batch_size)


def test_tensorboard_event_files_hold_epoch_and_step_scalars(tmp_path):
    """The TensorBoard files read back with EventAccumulator: one train/loss, val/loss and lr point per epoch
    at global steps 5, 10, 15 (5 steps/epoch), matching history; train/loss_step every log_interval steps."""
    train, val = _loaders()  # 5 batches -> 5 optimizer steps per epoch
    log_dir = tmp_path / "tb"
    trainer = make_trainer(
        linear_model(), train, val, max_epochs=3, log_interval=4, loggers=[TensorBoardLogger(log_dir, flush_secs=1)]
    )
    history = trainer.fit()
    assert list(log_dir.glob("events.out.tfevents.*"))

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "lr", "epoch_time_s", "train/loss_step", "lr_step"} <= scalars
    for tag in ("train/loss", "val/loss", "lr"):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [5, 10, 15], tag
        assert [p.value for p in points] == pytest.approx(history[tag], rel=1e-6), tag
    assert [p.step for p in events.Scalars("train/loss_step")] == [4, 8, 12]
    assert "config/text_summary" in events.Tags()["tensors"]  # log_config wrote the configuration as text


def test_custom_logger_receives_step_losses_every_log_interval(tmp_path):
    """A Logger subclass gets train/loss_step (== that step's batch loss) and lr_step at steps 3, 6, 9, 12,
    the epoch metrics at each epoch's last step, the config once, and close() once."""
    train, val = _loaders(n_train=32)  # 4 steps per epoch, 12 in all
    batch_losses = []

    class Batches(Callback):
        def on_train_batch_end(self, trainer, batch_index, terms):
            batch_losses.append(float(terms["loss"]))

    logger = RecordingLogger()
    trainer = make_trainer(
        linear_model(), train, val, max_epochs=3, log_interval=3, loggers=[logger], callbacks=[Batches()]
    )
    trainer.fit()

    step_records = [(step, m) for step, m in logger.records if "train/loss_step" in m]
    assert [step for step, _ in step_records] == [3, 6, 9, 12]
    assert [m["train/loss_step"] for _, m in step_records] == pytest.approx(
        [batch_losses[2], batch_losses[5], batch_losses[8], batch_losses[11]], rel=1e-6
    )
    assert all(m["lr_step"] == 0.05 for _, m in step_records)
    epoch_records = [(step, m) for step, m in logger.records if "train/loss" in m]
    assert [step for step, _ in epoch_records] == [4, 8, 12]
    assert [m["epoch"] for _, m in epoch_records] == [1.0, 2.0, 3.0]
    assert len(logger.configs) == 1 and logger.configs[0] == trainer.config.to_dict()
    assert logger.closed == 1


def test_logger_skipped_validation_epochs_log_no_val_metrics():
    """Loggers only get val/ metrics for epochs that validated (no NaN placeholders are logged)."""
    train, val = _loaders()
    logger = RecordingLogger()
    make_trainer(linear_model(), train, val, max_epochs=3, val_interval=2, loggers=[logger]).fit()
    epoch_records = [m for _, m in logger.records if "train/loss" in m]
    assert ["val/loss" in m for m in epoch_records] == [False, True, True]
    assert all(math.isfinite(v) for m in epoch_records for v in m.values())


@pytest.mark.parametrize("terminal", [False, True])
def test_console_logger_prints_a_compact_row_per_epoch(terminal):
    """One header, then one short row per epoch: train and val loss, the monitored metric (``*`` when it
    improved), lr and time; the other metrics (throughput, ...) stay out of it. On a terminal a progress bar
    runs over the batches."""
    train, val = _loaders()
    console_logger = ConsoleLogger()
    buffer = io.StringIO()
    console_logger.console = Console(file=buffer, width=300, force_terminal=terminal, color_system=None)
    trainer = make_trainer(linear_model(), train, val, max_epochs=3, loggers=[console_logger], monitor="val/loss")
    history = trainer.fit()
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", buffer.getvalue())  # without the progress bar's controls
    rows = re.findall(r"^\d+/3 .*$", output, flags=re.MULTILINE)
    assert [row.split()[0] for row in rows] == ["1/3", "2/3", "3/3"]
    assert output.count("train/loss") == 1 and "(* new best val/loss)" in output  # the header, once
    assert ("5/5" in output) is terminal  # the progress bar (batches done / total) only on a terminal
    for epoch, row in enumerate(rows):
        cells = row.split()
        assert cells[1] == f"{history['train/loss'][epoch]:.4g}" and cells[2] == f"{history['val/loss'][epoch]:.4g}"
        assert cells[-2:] == [f"{history['epoch_time_s'][epoch]:.4g}", "s"] and f"{history['lr'][epoch]:.4g}" in row
        assert ("*" in row) is (min(history["val/loss"][: epoch + 1]) == history["val/loss"][epoch])
        assert len(row) < 80 and "samples_per_s" not in output


def test_console_logger_is_the_default_and_can_stay_quiet(capsys):
    """Without loggers the Trainer uses a ConsoleLogger (to stderr); print_epochs=False prints nothing."""
    train, val = _loaders()
    config = TrainingConfig(max_epochs=2, batch_size=8, checkpoint_dir=None, device="cpu")
    trainer = Trainer(linear_model(), train, val, config=config)
    assert [type(lg) for lg in trainer.loggers] == [ConsoleLogger]
    trainer.fit()
    err = capsys.readouterr().err
    assert re.search(r"^1/2 ", err, flags=re.MULTILINE) and re.search(r"^2/2 ", err, flags=re.MULTILINE)

    quiet = Trainer(
        linear_model(), train, val, config=config, loggers=[ConsoleLogger(progress_bar=False, print_epochs=False)]
    )
    quiet.fit()
    assert "/2" not in capsys.readouterr().err


def test_every_metric_of_every_epoch_goes_to_the_epoch_log(caplog):
    """The full set (throughput and epoch time included) is logged once per epoch for the log file."""
    train, val = _loaders()
    with caplog.at_level("INFO", logger="mlff_distiller.training.trainer.epochs"):
        history = make_trainer(linear_model(), train, val, max_epochs=2).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "mlff_distiller.training.trainer.epochs"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for name in history:
        if name != "epoch":
            assert f"{name} " in lines[1], name
