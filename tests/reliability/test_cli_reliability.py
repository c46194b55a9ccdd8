"""The guarantees as a user meets them through `mlff-train` (real subprocesses): preemption exit codes and
resume from the run directory, fallback past a corrupt last.pt, a full disk, a planted pickle."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlff_distiller.training import load_checkpoint_file

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MLFF_TRAIN = str(BIN / "mlff-train") if (BIN / "mlff-train").exists() else shutil.which("mlff-train")
pytestmark = pytest.mark.skipif(MLFF_TRAIN is None, reason="mlff-train is not installed (pip install -e .)")
COMMON = ["experiment=smoke", "trainer.max_epochs=3", "scheduler=step", "trainer.step_size=1"]


def run(args: list[str], cwd: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Runs the command; ``.output`` holds stdout + stderr (logs go to stdout, errors to stderr)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(HERE)}
    result = subprocess.run(
        (command or [MLFF_TRAIN]) + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    result.output = result.stdout + result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output[-3000:]}"
    return result


def assert_same_weights(a: Path, b: Path) -> float:
    first, second = load_checkpoint_file(a), load_checkpoint_file(b)
    assert first["global_step"] == second["global_step"]
    # double(): the state holds a bool buffer (trained_elements), which torch cannot subtract.
    diff = max((first["model"][k].double() - second["model"][k].double()).abs().max().item() for k in first["model"])
    assert diff <= 1e-6
    return diff


def test_sigterm_exit_143_then_resume_from_run_dir_and_past_a_corrupt_last(tmp_path, reliability_report):
    ok(run(COMMON + ["hydra.run.dir=straight"], tmp_path))
    # smoke: 32 training structures in batches of 8 -> 4 steps per epoch; step 7 is epoch 2, batch 3.
    preempt = ["+callbacks.preempt._target_=reliability_kit.SignalAt", "+callbacks.preempt.step=7"]
    stopped = run(COMMON + preempt + ["hydra.run.dir=first"], tmp_path)
    assert stopped.returncode == 143, stopped.output[-3000:]
    assert "SIGTERM received: stopped in epoch 2 after batch 3 (global step 7)" in stopped.output
    assert "Resume with: mlff-train" in stopped.output and "Traceback" not in stopped.output
    saved = load_checkpoint_file(tmp_path / "first/checkpoints/last.pt")
    assert (saved["global_step"], saved["epoch_progress"]["batches"]) == (7, 3)
    shutil.copytree(tmp_path / "first", tmp_path / "first_corrupt")

    resumed = ok(run(COMMON + ["ckpt_path=first", "hydra.run.dir=resumed"], tmp_path))
    assert "Resumed inside epoch 2: skipped the 3 batches already trained on" in resumed.output
    diff = assert_same_weights(tmp_path / "straight/checkpoints/last.pt", tmp_path / "resumed/checkpoints/last.pt")

    last = tmp_path / "first_corrupt/checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn by a failing disk
    fallback = ok(run(COMMON + ["ckpt_path=first_corrupt", "hydra.run.dir=fallback"], tmp_path))
    assert "Checkpoint 'first_corrupt/checkpoints/last.pt' could not be read" in fallback.output
    assert "Falling back to the previous complete checkpoint" in fallback.output
    assert_same_weights(tmp_path / "straight/checkpoints/last.pt", tmp_path / "fallback/checkpoints/last.pt")
    reliability_report(
        "mlff-train preemption",
        f"SIGTERM at step 7 -> exit 143 with a mid-epoch last.pt; resume from the run dir: max |dw| vs "
        f"uninterrupted = {diff:.1e}; resume past a truncated last.pt (from previous.pt, with a warning): equal too",
    )


def test_disk_full_during_a_checkpoint_write(tmp_path):
    """ENOSPC halfway through writing epoch 2's last.pt: exit 2 with a clear message, epoch 1's last.pt intact,
    no partial file left."""
    script = textwrap.dedent(
        """
        import errno, sys, torch
        real_save, calls = torch.save, []
        def failing_save(obj, handle, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2 and hasattr(handle, "write"):
                handle.write(b"x" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, handle, *args, **kwargs)
        torch.save = failing_save
        from mlff_distiller.train import main
        sys.argv = ["mlff-train"] + sys.argv[1:]
        main()
        """
    )
    result = run(COMMON + ["hydra.run.dir=full"], tmp_path, command=[sys.executable, "-c", script])
    assert result.returncode == 2, result.output[-3000:]
    assert "the disk is full" in result.stderr and "Traceback" not in result.output
    checkpoints = tmp_path / "full/checkpoints"
    assert load_checkpoint_file(checkpoints / "last.pt")["epoch"] == 1
    assert not [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]


class Canary:
    """Unpickling this would create the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_planted_pickle_is_refused_by_the_cli(tmp_path):
    canary = tmp_path / "canary"
    torch.save({"format_version": 2, "model": Canary(str(canary))}, tmp_path / "evil.pt")
    result = run(["experiment=smoke", "ckpt_path=evil.pt", "hydra.run.dir=r"], tmp_path)
    assert result.returncode == 2 and "evil.pt" in result.stderr and "could not be read" in result.stderr
    assert not canary.exists()


def test_runs_started_in_the_same_second_get_their_own_directory():
    """The run directory's name carries microseconds (Hydra's default has whole seconds)."""
    from hydra import compose, initialize_config_module

    from mlff_distiller.cli import run_stamp as _run_stamp

    stamps = {_run_stamp() for _ in range(50)}
    assert len(stamps) == 50
    with initialize_config_module("mlff_distiller.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    pattern = r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}"
    assert re.fullmatch("outputs/" + pattern, cfg.hydra.run.dir)
    assert re.fullmatch("multirun/" + pattern, cfg.hydra.sweep.dir)
