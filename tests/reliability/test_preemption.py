"""Graceful preemption and exact resume: SIGTERM/SIGINT finish the optimizer step, write a mid-epoch
last.pt and stop with exit code 143/130; a fresh process resuming from it ends exactly where the
uninterrupted run ends (weights, optimizer moments, lr trajectory, plateau/early-stopping state, logged
steps). A second SIGINT aborts at once."""

from __future__ import annotations

import signal

import pytest
import torch
from reliability_kit import SCHEDULERS, RecordingLogger, SignalAt, build_run, trajectory
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlff_distiller.training import TensorBoardLogger, TrainingInterrupted, load_checkpoint_file

STEPS = 24  # 4 epochs x 6 batches


def _straight(tmp_path, scheduler, **overrides):
    logger = RecordingLogger()
    trainer = build_run(str(tmp_path / "straight"), scheduler, loggers=[logger], **overrides)
    trainer.fit()
    return trainer, logger


def _interrupt_and_resume(tmp_path, scheduler, signal_kwargs, **overrides):
    first_logger = RecordingLogger()
    run_dir = tmp_path / "interrupted"
    first = build_run(
        str(run_dir), scheduler, loggers=[first_logger], callbacks=[SignalAt(**signal_kwargs)], **overrides
    )
    with pytest.raises(TrainingInterrupted) as raised:
        first.fit()
    saved = load_checkpoint_file(run_dir / "last.pt")
    torch.manual_seed(999)  # the resumed process starts from unrelated RNG states and weights
    second_logger = RecordingLogger()
    resumed = build_run(str(run_dir), scheduler, model_seed=7, loggers=[second_logger], **overrides)
    resumed.load_checkpoint(run_dir)
    resumed.fit()
    return raised.value, saved, resumed, first_logger.records + second_logger.records


def _assert_same_end(straight, resumed, straight_records, resumed_records):
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(expected, actual), name
    for name, expected in straight.ema.state_dict()["shadow"].items():
        assert torch.equal(expected, resumed.ema.state_dict()["shadow"][name]), f"ema {name}"
    expected_opt, actual_opt = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for index, state in expected_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(actual_opt["state"][index][key])), key
    assert expected_opt["param_groups"][0]["lr"] == actual_opt["param_groups"][0]["lr"]
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert (straight.early_stopping, straight.best_metric, straight.best_epoch) == (
        resumed.early_stopping,
        resumed.best_metric,
        resumed.best_epoch,
    )
    assert straight.global_step == resumed.global_step == STEPS
    for name in ("lr", "train/loss", "val/loss"):
        assert straight.history[name] == resumed.history[name], name
    assert trajectory(straight_records) == trajectory(resumed_records)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path, scheduler, reliability_report):
    """SIGTERM after step 9 (epoch 2, batch 3 of 6): exit code 143, a mid-epoch last.pt, and the resumed
    run is bitwise the uninterrupted one, with shuffling, dropout, EMA and the cosine/step/plateau schedules."""
    straight, straight_logger = _straight(tmp_path, scheduler)
    interrupted, saved, resumed, records = _interrupt_and_resume(tmp_path, scheduler, {"step": 9})
    assert interrupted.exit_code == 143 and interrupted.signum == signal.SIGTERM
    assert "SIGTERM received: stopped in epoch 2 after batch 3" in str(interrupted)
    assert saved["global_step"] == 9 and saved["epoch"] == 1
    assert saved["epoch_progress"]["batches"] == 3
    _assert_same_end(straight, resumed, straight_logger.records, records)
    reliability_report(
        f"preemption ({scheduler})",
        "SIGTERM at step 9 (mid-epoch) -> exit 143, resumed run bitwise "
        "equal to the uninterrupted one (weights, EMA, Adam/SGD moments, lr, scheduler state, "
        f"{len(records)} logged points at the same steps)",
    )


def test_sigint_at_epoch_boundary_and_with_accumulation(tmp_path):
    """SIGINT during epoch 2's validation -> exit code 130 after the epoch's checkpoint; with gradient
    accumulation a signal in the middle of a window waits for the window's optimizer step."""
    straight, logger = _straight(tmp_path, "cosine")
    interrupted, saved, resumed, records = _interrupt_and_resume(
        tmp_path, "cosine", {"validation": 2, "signum": signal.SIGINT}
    )
    assert interrupted.exit_code == 130 and "after epoch 2" in str(interrupted)
    assert saved["epoch"] == 2 and saved["epoch_progress"] is None
    _assert_same_end(straight, resumed, logger.records, records)

    accumulate = {"gradient_accumulation_steps": 2}
    straight_acc, logger_acc = _straight(tmp_path / "acc", "plateau", **accumulate)
    interrupted, saved, resumed, records = _interrupt_and_resume(
        tmp_path / "acc",
        "plateau",
        {"batch": 2},
        **accumulate,  # first micro-batch of a window
    )
    assert saved["epoch_progress"]["batches"] == 4 and saved["global_step"] == 2
    assert "after batch 4" in str(interrupted)
    assert straight_acc.global_step == resumed.global_step == 12
    for (name, expected), actual in zip(straight_acc.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(expected, actual), name
    assert trajectory(logger_acc.records) == trajectory(records)


def test_second_sigint_aborts_at_once(tmp_path):
    """Two SIGINTs: KeyboardInterrupt right away, no mid-epoch checkpoint, the last complete one intact."""
    run_dir = tmp_path / "run"
    trainer = build_run(str(run_dir), "cosine", callbacks=[SignalAt(step=9, signum=signal.SIGINT, times=2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = load_checkpoint_file(run_dir / "last.pt")
    assert (saved["epoch"], saved["global_step"], saved["epoch_progress"]) == (1, 6, None)
    assert trainer.global_step == 9
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored after fit()


def test_tensorboard_curves_continue_without_duplicates(tmp_path):
    """Interrupted run logs into one directory, resumed run into another (as mlff-train does): together they
    hold each (tag, step) of the uninterrupted run exactly once. Resumed into the SAME directory after a
    kill that lost logged points, the stale points past the checkpoint are purged."""

    def points(log_dir):
        events = EventAccumulator(str(log_dir))
        events.Reload()
        return [
            (tag, e.step, e.value)
            for tag in events.Tags()["scalars"]
            for e in events.Scalars(tag)
            if tag not in ("epoch_time_s", "train/samples_per_s")
        ]

    build_run(None, "step", loggers=[TensorBoardLogger(tmp_path / "tb_straight", flush_secs=1)]).fit()
    first = build_run(
        str(tmp_path / "ckpt"),
        "step",
        callbacks=[SignalAt(step=9)],
        loggers=[TensorBoardLogger(tmp_path / "tb_first", flush_secs=1)],
    )
    with pytest.raises(TrainingInterrupted):
        first.fit()
    second = build_run(
        str(tmp_path / "ckpt"), "step", loggers=[TensorBoardLogger(tmp_path / "tb_second", flush_secs=1)]
    )
    second.load_checkpoint(tmp_path / "ckpt")
    second.fit()
    straight = points(tmp_path / "tb_straight")
    combined = points(tmp_path / "tb_first") + points(tmp_path / "tb_second")
    assert len(combined) == len(set((t, s) for t, s, _ in combined)), "duplicate points"
    assert sorted(combined) == sorted(straight)
    assert min(s for _, s, _ in points(tmp_path / "tb_second")) == 10

    # A run that went on logging after its last checkpoint and then died: resume into the same directory.
    same = tmp_path / "tb_same"
    crashed = build_run(str(tmp_path / "ckpt2"), "step", keep_last=4, loggers=[TensorBoardLogger(same, flush_secs=1)])
    crashed.fit()  # 4 epochs logged; pretend it died after epoch 4's logs but resume from epoch 2's checkpoint
    again = build_run(str(tmp_path / "ckpt2"), "step", loggers=[TensorBoardLogger(same, flush_secs=1)])
    again.load_checkpoint(tmp_path / "ckpt2" / "epoch_0002.pt")
    again.fit()
    merged = points(same)
    assert len(merged) == len(set((t, s) for t, s, _ in merged))
    assert sorted(merged) == sorted(straight)


def test_a_foreign_handler_runs_after_the_save(tmp_path):
    """SLURM's --signal warning (submitit installs a SIGUSR2 handler that requeues the job): the Trainer
    saves a mid-epoch last.pt first, then calls that handler."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        trainer = build_run(str(tmp_path), "cosine", callbacks=[SignalAt(step=9, signum=signal.SIGUSR2)])
        with pytest.raises(TrainingInterrupted) as raised:
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2] and raised.value.exit_code == 128 + signal.SIGUSR2
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch_progress"]["batches"] == 3
