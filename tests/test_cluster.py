"""Cluster engines through their Hydra plugins (optional extras; CI installs them): a submitit_local
multirun, an Optuna search in which one trial fails, and auto_resume as a requeued job uses it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlff_distiller.training import load_checkpoint_file

BIN = Path(sys.executable).parent
MLFF_TRAIN = str(BIN / "mlff-train")
KIT = Path(__file__).resolve().parent / "reliability"
pytestmark = pytest.mark.skipif(not Path(MLFF_TRAIN).exists(), reason="mlff-train is not installed")
FAST = ["experiment=smoke", "logger=none", "trainer.max_epochs=1"]


def _needs(module: str, extra: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install 'mlff-distiller[{extra}]')",
    )


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(KIT)}
    return subprocess.run([MLFF_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@_needs("hydra_plugins.hydra_submitit_launcher", "cluster")
def test_submitit_local_multirun_runs_each_job_in_its_own_directory(tmp_path):
    result = _run(["-m", "hydra/launcher=submitit_local", *FAST, "optimizer=adam,sgd"], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    for job, optimizer in ((0, "Adam"), (1, "SGD")):
        state = load_checkpoint_file(sweeps[0] / str(job) / "checkpoints/last.pt")
        assert state["optimizer_class"] == optimizer and state["epoch"] == 1
        assert (sweeps[0] / str(job) / "metrics.json").is_file()


@_needs("hydra_plugins.hydra_optuna_sweeper", "optuna")
def test_optuna_search_survives_a_failed_trial(tmp_path):
    crash = [
        "+callbacks.crash._target_=reliability_kit.CrashInJob",
        "+callbacks.crash.job=1",
        "+callbacks.crash.this_job=${hydra:job.num}",
    ]
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *FAST, *crash]
    result = _run(args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "This job failed (RuntimeError: deliberate failure of job 1); the sweep goes on" in output
    sweep = next((tmp_path / "multirun").glob("*/*"))
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finished = [load_checkpoint_file(sweep / str(j) / "checkpoints/last.pt") for j in (0, 2)]
    assert results["best_value"] == pytest.approx(min(s["best_metric"] for s in finished))
    assert set(results["best_params"]) == {
        "trainer.learning_rate",
        "model.hidden",
        "loss.energy_weight",
        "loss.force_weight",
    }
    assert not (sweep / "1" / "checkpoints" / "last.pt").exists()


def test_auto_resume_continues_a_run_in_its_own_directory(tmp_path):
    """A requeued cluster job starts again in its run directory: with auto_resume it continues there."""
    first = _run([*FAST, "hydra.run.dir=run"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _run([*FAST, "trainer.max_epochs=2", "hydra.run.dir=run"], tmp_path)
    assert refused.returncode == 2 and "already holds" in refused.stderr
    again = _run([*FAST, "trainer.max_epochs=2", "auto_resume=true", "hydra.run.dir=run"], tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "auto_resume: continuing the run" in again.stdout + again.stderr
    state = load_checkpoint_file(tmp_path / "run/checkpoints/last.pt")
    assert state["epoch"] == 2 and load_checkpoint_file(tmp_path / "run/checkpoints/previous.pt")["epoch"] == 1
