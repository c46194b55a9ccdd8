"""EpochProgress: the typed position inside an epoch, as a checkpoint stores it (also in the older format)."""

from __future__ import annotations

import pytest
import torch

from mlff_distiller.training.metrics import Mean, MetricSums
from mlff_distiller.training.progress import EpochProgress


def test_state_dict_round_trip_and_window_accounting():
    """Windows add their samples to `processed`; only applied ones add terms and `samples`; the state is
    plain data with the keys of format 2 and comes back equal."""
    progress = EpochProgress.start(loader=None, lr=0.01)
    window = MetricSums()
    window.add({"loss": torch.tensor(2.0), "mae": Mean(torch.tensor(3.0), torch.tensor(4.0))}, weight=8)
    progress.add_window(window, samples=8, applied=True)
    progress.add_window(window, samples=8, applied=False)  # a skipped (non-finite) step
    progress.batches, progress.elapsed_s = 2, 1.5
    state = progress.state_dict()
    assert set(state) == {"batches", "processed", "samples", "sums", "elapsed_s", "lr", "rng", "loader_generator"}
    assert (state["processed"], state["samples"]) == (16, 8)
    again = EpochProgress.from_state_dict(state)
    assert again.sums.compute() == pytest.approx({"loss": 2.0, "mae": 0.75})
    assert (again.batches, again.processed, again.samples, again.elapsed_s, again.lr) == (2, 16, 8, 1.5, 0.01)


def test_a_format_2_position_from_before_exact_metrics_still_loads():
    """Mid-epoch checkpoints written before exact metrics kept sample-weighted sums of per-sample means."""
    old = EpochProgress.start(loader=None, lr=0.02).state_dict()
    old.update(batches=3, processed=24, samples=24, sums={"loss": 12.0, "force_mae": 48.0})
    progress = EpochProgress.from_state_dict(old)
    assert progress.sums.compute(prefix="train/") == pytest.approx({"train/loss": 0.5, "train/force_mae": 2.0})
    assert progress.batches == 3
