"""Checkpoint files under hostile conditions: retention, torn or garbage files, foreign models, changed
configs, format versions, planted pickles, a full disk, non-finite weights, and a directory in use."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_kit import build_run, digest

from mlff_distiller.training import CheckpointError, ConfigError, load_checkpoint_file, load_model_weights
from mlff_distiller.training import checkpoint as checkpoint_module
from mlff_distiller.training.checkpoint import FORMAT_VERSION, load_latest_checkpoint, save_checkpoint

PACKAGE = Path(checkpoint_module.__file__).resolve().parents[1]


def _fit(directory: Path, **overrides):
    trainer = build_run(str(directory), "cosine", **overrides)
    trainer.fit()
    return trainer


# ----------------------------------------------------------------------------- retention
def test_retention_keeps_last_previous_best_and_the_last_n_epochs(tmp_path):
    trainer = _fit(tmp_path, max_epochs=5, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["best_model.pt", "epoch_0004.pt", "epoch_0005.pt", "last.pt", "previous.pt"]
    assert load_checkpoint_file(tmp_path / "epoch_0004.pt")["epoch"] == 4
    assert load_checkpoint_file(tmp_path / "previous.pt")["epoch"] == 4
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["epoch"] == 5 and digest(last["model"]) == digest(trainer.model.state_dict())
    assert load_checkpoint_file(tmp_path / "best_model.pt")["epoch"] == trainer.best_epoch


def test_a_failed_write_removes_nothing(tmp_path, monkeypatch):
    """The 4th epoch's last.pt cannot be written: epoch 2-3 files, previous.pt and last.pt (epoch 3) remain."""
    _fit(tmp_path, max_epochs=3, keep_last=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".pt"}
    _fail_torch_save(monkeypatch, errno.ENOSPC)
    resumed = build_run(str(tmp_path), "cosine", max_epochs=4, keep_last=2)
    resumed.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="the disk is full"):
        resumed.fit()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".pt"}
    assert (
        after.keys() == before.keys() == {"best_model.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt", "previous.pt"}
    )
    assert after["last.pt"] == before["last.pt"] and after["epoch_0002.pt"] == before["epoch_0002.pt"]
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 3


def _fail_torch_save(monkeypatch, code: int) -> None:
    """Every checkpoint write fails halfway with ``code`` (ENOSPC: a full disk), as the OS reports it."""
    real_save = torch.save

    def failing(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[:500])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_module.torch, "save", failing)


def test_disk_full_error_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch, reliability_report):
    _fail_torch_save(monkeypatch, errno.ENOSPC)
    with pytest.raises(CheckpointError) as raised:
        _fit(tmp_path, max_epochs=2)
    message = str(raised.value)
    assert "last.pt" in message and "the disk is full" in message and "No space left on device" in message
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # no last.pt, no temporary file
    reliability_report(
        "disk full",
        "ENOSPC mid-write: CheckpointError naming the file, previous files intact, "
        "no partial file left (also via mlff-train: exit 2)",
    )


# ----------------------------------------------------------------------------- corrupt, foreign, changed
def test_truncated_and_garbage_files_are_named_and_a_directory_falls_back(tmp_path, caplog):
    trainer = _fit(tmp_path, max_epochs=3, keep_last=1)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    for broken in (data[: len(data) // 2], b"\x00" * 100, b"not a checkpoint at all"):
        last.write_bytes(broken)
        with pytest.raises(CheckpointError, match=re.escape(str(last))):
            load_checkpoint_file(last)
    last.write_bytes(data[:1000])
    previous = load_checkpoint_file(tmp_path / "previous.pt")
    with caplog.at_level(logging.WARNING):
        resumed = build_run(str(tmp_path), "cosine", max_epochs=3, keep_last=1)
        resumed.load_checkpoint(tmp_path)
    assert "Falling back to the previous complete checkpoint" in caplog.text and str(last) in caplog.text
    assert resumed.epoch == previous["epoch"] == 2
    # Every candidate unreadable: one error listing each file.
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="No readable checkpoint") as raised:
        load_latest_checkpoint(tmp_path)
    for name in ("last.pt", "previous.pt", "epoch_0003.pt", "best_model.pt"):
        assert name in str(raised.value)
    assert trainer.epoch == 3


def test_foreign_model_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    _fit(tmp_path, max_epochs=1)
    foreign = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with pytest.raises(CheckpointError) as raised:
        load_model_weights(foreign, tmp_path / "last.pt")
    message = str(raised.value)
    assert "missing keys ['2.bias', '2.weight']" in message
    assert "unexpected keys ['3.bias', '3.weight']" in message
    assert "'0.weight: checkpoint (16, 4) vs model (8, 4)'" in message and "'0.bias: checkpoint (16,)" in message
    assert str(tmp_path / "last.pt") in message


def test_changed_config_is_refused_unless_allowed(tmp_path, caplog):
    _fit(tmp_path, max_epochs=2)
    changed = build_run(str(tmp_path), "cosine", max_epochs=3, learning_rate=0.1)
    with pytest.raises(CheckpointError, match=r"fingerprint [0-9a-f]{16}, now [0-9a-f]{16}: learning_rate"):
        changed.load_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        changed.load_checkpoint(tmp_path, strict_config=False)
    assert "Resuming" in caplog.text and "learning_rate" in caplog.text
    # Fields that do not change the optimisation may change: more epochs, another checkpoint policy.
    build_run(str(tmp_path), "cosine", max_epochs=5, keep_last=3, checkpoint_every_n_steps=2).load_checkpoint(tmp_path)


def test_format_version_is_written_and_checked(tmp_path):
    _fit(tmp_path, max_epochs=1)
    state = load_checkpoint_file(tmp_path / "last.pt")
    assert state["format_version"] == FORMAT_VERSION == 2 and len(state["config_fingerprint"]) == 16
    state["format_version"] = FORMAT_VERSION + 1
    save_checkpoint(state, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format_version 3; this version of mlff_distiller reads"):
        load_checkpoint_file(tmp_path / "future.pt")
    del state["format_version"]
    save_checkpoint(state, tmp_path / "unversioned.pt")
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint_file(tmp_path / "unversioned.pt")
    # A version-1 file (written before mid-epoch checkpoints existed) still resumes.
    old = load_checkpoint_file(tmp_path / "last.pt")
    old["format_version"] = 1
    del old["epoch_progress"], old["config_fingerprint"]
    save_checkpoint(old, tmp_path / "v1" / "last.pt")
    resumed = build_run(str(tmp_path / "v1"), "cosine", max_epochs=2)
    resumed.load_checkpoint(tmp_path / "v1")
    resumed.fit()
    assert resumed.epoch == 2


# ----------------------------------------------------------------------------- untrusted files
class Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling creates the file


def test_planted_pickle_never_runs(tmp_path, reliability_report):
    canary = tmp_path / "canary"
    evil = tmp_path / "evil" / "last.pt"
    evil.parent.mkdir()
    torch.save({"format_version": 2, "model": Canary(str(canary))}, evil)
    trainer = build_run(str(tmp_path / "run"), "cosine")
    attempts = [
        lambda: load_checkpoint_file(evil),
        lambda: load_model_weights(trainer.model, evil),
        lambda: trainer.load_checkpoint(evil),
        lambda: trainer.load_checkpoint(evil.parent),
    ]
    from mlff_distiller.calculator import StudentCalculator

    attempts.append(lambda: StudentCalculator.from_checkpoint(evil))
    for attempt in attempts:
        with pytest.raises(CheckpointError, match="could not be read|No readable checkpoint"):
            attempt()
    assert not canary.exists()
    # Every torch.load in the package passes weights_only=True.
    calls = []
    for path in PACKAGE.rglob("*.py"):
        calls += [(path.name, line) for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
    reliability_report(
        "untrusted files",
        f"planted pickle refused by {len(attempts)} entry points (+ mlff-train "
        f"ckpt_path), canary never written; {len(calls)} torch.load call(s), all weights_only=True",
    )


# ----------------------------------------------------------------------------- non-finite weights
def test_no_checkpoint_ever_holds_a_non_finite_weight(tmp_path):
    """A weight turned infinite (an overflowing update) makes the epoch-end save refuse, naming the tensor;
    the previous complete last.pt stays."""
    from mlff_distiller.training import Callback

    class Poison(Callback):
        def on_train_epoch_end(self, trainer, metrics):
            if trainer.epoch == 2:
                with torch.no_grad():
                    trainer.model[0].weight[0, 0] = float("inf")

    trainer = build_run(str(tmp_path), "cosine", ema_decay=None, callbacks=[Poison()])
    with pytest.raises(CheckpointError, match=r"non-finite values in \['0.weight'\]"):
        trainer.fit()
    state = load_checkpoint_file(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ----------------------------------------------------------------------------- exclusive use
def test_a_directory_in_use_or_holding_another_run_is_refused(tmp_path):
    _fit(tmp_path / "done", max_epochs=1)
    with pytest.raises(ConfigError, match="already holds"):
        build_run(str(tmp_path / "done"), "cosine").fit()
    assert load_checkpoint_file(tmp_path / "done" / "last.pt")["epoch"] == 1

    busy = tmp_path / "busy"
    busy.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "os.write(fd, str(os.getpid()).encode()); fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); "
            "time.sleep(60)",
            str(busy / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another running training process \(pid {holder.pid}\)"):
            build_run(str(busy), "cosine").fit()
    finally:
        holder.kill()
        holder.wait()
    build_run(str(busy), "cosine", max_epochs=1).fit()  # free again once the holder is gone


def test_best_model_is_never_older_than_last(tmp_path, monkeypatch):
    """Killed after the new state is complete but before it becomes last.pt: best_model.pt already holds
    it, last.pt the previous epoch; the resumed run redoes that epoch and ends consistent."""
    _fit(tmp_path, max_epochs=1)
    real_replace = checkpoint_module.os.replace

    def crash_before_last(src, dst):
        if str(dst).endswith("last.pt"):
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_before_last)
    resumed = build_run(str(tmp_path), "cosine", max_epochs=3)
    resumed.load_checkpoint(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 1
    assert load_checkpoint_file(tmp_path / "best_model.pt")["epoch"] == 2
    again = build_run(str(tmp_path), "cosine", max_epochs=3)
    again.load_checkpoint(tmp_path)
    again.fit()
    last, best = load_checkpoint_file(tmp_path / "last.pt"), load_checkpoint_file(tmp_path / "best_model.pt")
    assert best["epoch"] == last["best_epoch"] and digest(best["model"]) == digest(
        load_checkpoint_file(tmp_path / "previous.pt")["model"] if last["best_epoch"] == 2 else best["model"]
    )


def test_the_lock_is_not_inherited_by_dataloader_workers(tmp_path):
    """Persistent DataLoader workers (forked processes) must not keep the directory locked: a second fit()
    of the same trainer, training further, is not refused."""
    from torch.utils.data import DataLoader, TensorDataset

    trainer = build_run(str(tmp_path), "cosine", max_epochs=1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    trainer.train_loader = DataLoader(TensorDataset(x, y), batch_size=8, num_workers=1, persistent_workers=True)
    trainer.fit()
    trainer.config.max_epochs = 2
    trainer.fit()
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 2
