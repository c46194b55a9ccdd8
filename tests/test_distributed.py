"""Multi-process training through torchrun (gloo on CPU): one run directory, rank 0 writes, and two
processes with batch B train exactly like one process with batch 2B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlff_distiller.training import load_checkpoint_file

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "mlff-train").exists(), reason="mlff-train is not installed")
# 16 training structures: an even split, so no process pads its share with a repeated structure.
SMOKE = [
    "experiment=smoke",
    "trainer.max_epochs=1",
    "logger=none",
    "data.num_train=16",
]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_two_gloo_processes_equal_one_process_with_the_union_batch(tmp_path):
    # 2 ranks x batch 4 <-> 1 process x batch 8: 2 steps either way.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run(torchrun + ["-m", "mlff_distiller.train", *SMOKE, "trainer.batch_size=4"], tmp_path)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks agreed on rank 0's run directory
    run_dir = runs[0]
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert files == ["best_model.pt", "last.pt"]
    assert (run_dir / "metrics.json").is_file()
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert sum("Best val/force_mae" in line for line in log_lines) == 1  # only rank 0 writes the log

    _run([str(BIN / "mlff-train"), *SMOKE, "trainer.batch_size=8", "hydra.run.dir=single"], tmp_path)
    multi = load_checkpoint_file(run_dir / "checkpoints/last.pt")
    single = load_checkpoint_file(tmp_path / "single/checkpoints/last.pt")
    assert multi["global_step"] == single["global_step"] == 2
    gap = max((multi["model"][k] - v).abs().max().item() for k, v in single["model"].items())
    for name, value in single["model"].items():
        torch.testing.assert_close(multi["model"][name], value, rtol=0, atol=1e-5)
    # The runs really trained: the weights moved far more than the tolerance (EMA lags the weights).
    moved = max((single["model"][k] - single["ema"]["shadow"][k]).abs().max().item() for k in single["ema"]["shadow"])
    assert moved > 1e-4, moved  # ten times the tolerance
    print(f"2 gloo processes vs 1 process: max |dw| = {gap:.1e} (weights moved {moved:.1e})")
    assert multi["history"]["val/force_mae"] == pytest.approx(single["history"]["val/force_mae"], rel=1e-5)
