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
    # double(): the state holds a bool buffer (trained_elements), which torch cannot subtract.
    gap = max((multi["model"][k].double() - v.double()).abs().max().item() for k, v in single["model"].items())
    for name, value in single["model"].items():
        torch.testing.assert_close(multi["model"][name], value, rtol=0, atol=1e-5)
    # The runs really trained: the weights moved far more than the tolerance (EMA lags the weights).
    moved = max((single["model"][k] - single["ema"]["shadow"][k]).abs().max().item() for k in single["ema"]["shadow"])
    assert moved > 1e-4, moved  # ten times the tolerance
    print(f"2 gloo processes vs 1 process: max |dw| = {gap:.1e} (weights moved {moved:.1e})")
    assert multi["history"]["val/force_mae"] == pytest.approx(single["history"]["val/force_mae"], rel=1e-5)


def _two_rank_checks(rank: int, port: int, directory: str, results) -> None:
    """Runs in each of 2 gloo processes (torch.multiprocessing.spawn)."""
    import signal as signals

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset

    from mlff_distiller.training import Callback, Trainer, TrainingConfig, TrainingInterrupted, distributed

    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    class LateSignal(Callback):
        """Rank 1 alone receives SIGTERM after step 3's agreement (inside on_optimizer_step)."""

        def on_optimizer_step(self, trainer):
            if rank == 1 and trainer.global_step == 3:
                os.kill(os.getpid(), signals.SIGTERM)

    shard = x[rank::2], y[rank::2]
    config = TrainingConfig(
        max_epochs=3, optimizer="sgd", learning_rate=0.01, checkpoint_dir=directory, device="cpu", log_interval=1000
    )
    trainer = Trainer(
        model,
        DataLoader(TensorDataset(*shard), batch_size=4),
        None,
        config=config,
        device="cpu",
        loggers=[],
        callbacks=[LateSignal()],
    )
    try:
        trainer.fit()
        stopped = None
    except TrainingInterrupted as error:
        stopped = (trainer.global_step, error.exit_code)
    # An empty validation shard on rank 1: the metric names are agreed on, the means are rank 0's.
    val = DataLoader(TensorDataset(x[:4], y[:4]), batch_size=4) if rank == 0 else []
    metrics = trainer.validate(val)
    results[rank] = (stopped, metrics)
    distributed.barrier()
    distributed.destroy()


def test_ranks_stop_together_and_agree_on_metric_names(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_rank_checks, args=(port, str(tmp_path), results), nprocs=2, join=True)
    (stop0, val0), (stop1, val1) = results[0], results[1]
    assert stop0 == stop1 and stop0[1] == 143 and stop0[0] == 4  # agreed at the next step, on both ranks
    assert val0 == val1 and set(val0) == {"val/loss"}
