"""`mlff-train` run as a user runs it: a real subprocess in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BIN = Path(sys.executable).parent
MLFF_TRAIN = str(BIN / "mlff-train") if (BIN / "mlff-train").exists() else shutil.which("mlff-train")
pytestmark = pytest.mark.skipif(MLFF_TRAIN is None, reason="mlff-train is not installed (pip install -e .)")


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, command: list[str] | None = None):
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        (command or [MLFF_TRAIN]) + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=240
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_one_epoch_run_writes_every_artifact(tmp_path):
    result = ok(run(["experiment=smoke", "trainer.max_epochs=1", "hydra.run.dir=run"], tmp_path))
    run_dir = tmp_path / "run"
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= {p.name for p in (run_dir / ".hydra").iterdir()}
    assert yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text()) == [
        "experiment=smoke",
        "trainer.max_epochs=1",
    ]
    last, best = load(run_dir / "checkpoints/last.pt"), load(run_dir / "checkpoints/best_model.pt")
    assert last["epoch"] == best["epoch"] == 1
    assert last["global_step"] == 4  # 32 training structures / batch 8
    assert last["config"]["extra"]["run_config"]["trainer"]["max_epochs"] == 1
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    log_text = (run_dir / "train.log").read_text()
    assert "epoch 1/1" in log_text and "val/force_mae" in log_text
    # The console shows a compact row per epoch; the log file has every metric.
    assert "train/samples_per_s" in log_text and "samples_per_s" not in result.stdout + result.stderr
    assert "(* new best val/force_mae)" in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["global_step"] == 4
    assert metrics["best/val/force_mae"] == pytest.approx(metrics["val/force_mae"])
    # The test split is evaluated with the best checkpoint; errors in meV, next to the label spread.
    for key in ("test/energy_mae_per_atom", "test/force_mae", "test/force_rmse", "test/force_std"):
        assert 0 < metrics[key] < float("inf"), key
    assert 500 < metrics["test/force_std"] < 3000  # EMT Cu-Au forces: about 1 eV/Å
    assert "test/force_mae" in log_text


def test_default_job_runs_end_to_end_and_learns(tmp_path):
    """The built-in default job (generate + label with the EMT teacher, train the default student,
    test) at a reduced size: the validation force error falls and the student beats zero forces."""
    ok(
        run(
            [
                "data.source.num_structures=120",
                "data.num_val=10",
                "data.num_test=10",
                "trainer.max_epochs=4",
                "hydra.run.dir=run",
            ],
            tmp_path,
        )
    )
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    history = load(tmp_path / "run/checkpoints/last.pt")["history"]
    assert metrics["epoch"] == 4
    assert history["val/force_mae"][-1] < 0.8 * history["val/force_mae"][0]
    assert metrics["test/force_mae"] < 0.8 * metrics["test/force_std"]


def test_multirun_sweep_gives_isolated_jobs(tmp_path):
    result = ok(
        run(
            ["-m", "experiment=smoke", "optimizer=adam,sgd", "scheduler=cosine,step", "hydra.sweep.dir=sweep"], tmp_path
        )
    )
    assert "Launching 4 jobs" in result.stdout + result.stderr
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        choice = tuple(o for o in overrides if o.startswith(("optimizer=", "scheduler=")))
        seen.add(choice)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["epoch"] == 2
        checkpoint = load(job / "checkpoints/last.pt")
        assert checkpoint["config"]["extra"]["overrides"] == overrides
        assert checkpoint["optimizer_class"] == ("SGD" if "optimizer=sgd" in choice else "Adam")
        assert len(list((job / "tensorboard").iterdir())) == 1
    assert len(seen) == 4


def test_cli_cosine_follows_the_run_like_the_python_api(tmp_path):
    """Regression: the command line's cosine had T_max = max_epochs also per step, so its lr fell to min_lr in
    4 steps and rose again. Now, per epoch and per step, the lr of every optimizer step (TensorBoard lr_step)
    equals the Python API's for the same settings, and never rises after the warmup."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    from mlff_distiller.training import Trainer, TrainingConfig

    sweep = ["trainer.scheduler_interval=epoch,step", "trainer.max_epochs=4", "trainer.warmup_steps=3"]
    ok(run(["-m", "experiment=smoke", "trainer.log_interval=1", *sweep, "hydra.sweep.dir=sweep"], tmp_path))
    for job in sorted((tmp_path / "sweep").glob("[0-9]*")):
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        interval = next(o.split("=")[1] for o in overrides if o.startswith("trainer.scheduler_interval="))
        events = EventAccumulator(str(job / "tensorboard"))
        events.Reload()
        points = events.Scalars("lr_step")
        assert [p.step for p in points] == list(range(1, 17))  # 4 epochs x 4 steps (32 structures, batch 8)

        # The same schedule through the Python API: names in TrainingConfig, 4 batches per epoch.
        config = TrainingConfig(
            max_epochs=4, learning_rate=5e-3, min_lr=1e-5, warmup_steps=3, optimizer="adam", lr_scheduler="cosine",
            scheduler_interval=interval, checkpoint_dir=None, device="cpu", log_interval=1000, batch_size=1,
        )  # fmt: skip
        batches = DataLoader(TensorDataset(torch.randn(4, 2), torch.randn(4, 1)), batch_size=1)
        trainer = Trainer(torch.nn.Linear(2, 1), batches, config=config, loggers=[])
        lrs: list[float] = []
        trainer.optimizer.register_step_pre_hook(lambda opt, *_, lrs=lrs: lrs.append(opt.param_groups[0]["lr"]))
        trainer.fit()
        assert [p.value for p in points] == pytest.approx(lrs, rel=1e-6), interval
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])), interval  # non-increasing after the warmup
        assert lrs[-1] < 0.2 * lrs[2], interval  # and it anneals


def test_max_time_stops_saves_and_tests(tmp_path):
    """A budget spent by the first optimizer step: that epoch is validated and saved, the test split evaluated."""
    result = ok(run(["experiment=smoke", "trainer.max_time=0.001", "logger=none", "hydra.run.dir=run"], tmp_path))
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert (metrics["global_step"], metrics["epoch"]) == (1, 1)
    assert metrics["test/force_mae"] > 0 and "val/force_mae" in metrics
    assert "max_time=0.001 s is spent" in result.stdout + result.stderr
    assert load(tmp_path / "run/checkpoints/last.pt")["elapsed_s"] >= 0.001


def test_resume_equals_uninterrupted_run(tmp_path):
    """2 epochs + resume to 3 gives the same weights as 3 epochs straight (step scheduler, shuffled data)."""
    common = ["experiment=smoke", "scheduler=step", "trainer.step_size=1"]
    ok(run(common + ["trainer.max_epochs=3", "hydra.run.dir=straight"], tmp_path))
    ok(run(common + ["trainer.max_epochs=2", "hydra.run.dir=first"], tmp_path))
    result = ok(run(common + ["trainer.max_epochs=3", "ckpt_path=first", "hydra.run.dir=resumed"], tmp_path))
    assert "Resuming" in result.stdout + result.stderr
    straight, resumed = load(tmp_path / "straight/checkpoints/last.pt"), load(tmp_path / "resumed/checkpoints/last.pt")
    assert resumed["epoch"] == 3 and resumed["global_step"] == straight["global_step"] == 12
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6)
    assert resumed["history"]["lr"] == straight["history"]["lr"]
    assert resumed["history"]["val/force_mae"] == pytest.approx(straight["history"]["val/force_mae"], abs=1e-6)
    # The best model so far travels into the new run directory, so the test split is still evaluated.
    assert (tmp_path / "resumed/checkpoints/best_model.pt").is_file()
    assert "test/force_mae" in json.loads((tmp_path / "resumed/metrics.json").read_text())
    # The first run's files are untouched by the resumed one.
    assert load(tmp_path / "first/checkpoints/last.pt")["epoch"] == 2


def test_resume_that_cannot_be_honoured_is_an_error(tmp_path):
    ok(run(["experiment=smoke", "trainer.max_epochs=1", "hydra.run.dir=first"], tmp_path))
    missing = run(["experiment=smoke", "ckpt_path=nowhere", "hydra.run.dir=r1"], tmp_path)
    assert missing.returncode == 2 and "ckpt_path='nowhere' does not exist" in missing.stderr
    changed = run(["experiment=smoke", "optimizer=sgd", "ckpt_path=first", "hydra.run.dir=r2"], tmp_path)
    assert changed.returncode == 2
    assert "optimizer._target_" in changed.stderr and "experiment=smoke trainer.max_epochs=1" in changed.stderr
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    garbage = run(["experiment=smoke", "ckpt_path=garbage.pt", "hydra.run.dir=r3"], tmp_path)
    assert garbage.returncode == 2 and "garbage.pt" in garbage.stderr and "could not be read" in garbage.stderr
    faster = run(["experiment=smoke", "trainer.learning_rate=0.01", "ckpt_path=first", "hydra.run.dir=r4"], tmp_path)
    assert faster.returncode == 2 and "trainer.learning_rate: checkpoint 0.005, now 0.01" in faster.stderr
    for name in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / name / "checkpoints").exists()
    # What the Trainer accepts on resume the command line accepts too (one list): more epochs, another interval;
    # also from a run saved before the Trainer set the cosine's T_max (its scheduler config named T_max).
    from mlff_distiller.training import save_checkpoint

    state = load(tmp_path / "first/checkpoints/last.pt")
    state["config"]["extra"]["run_config"]["scheduler"]["T_max"] = "${trainer.max_epochs}"
    save_checkpoint(state, tmp_path / "first/checkpoints/last.pt")
    more = ["experiment=smoke", "trainer.max_epochs=2", "trainer.log_interval=1", "trainer.val_interval=2"]
    ok(run([*more, "ckpt_path=first", "hydra.run.dir=r5"], tmp_path))
    assert load(tmp_path / "r5/checkpoints/last.pt")["epoch"] == 2


@pytest.mark.parametrize(
    "args,expected",
    [
        (["optimizer=adamm"], ["optimizer/adamm", "adam", "adamw", "sgd"]),
        (["scheduler=cosin"], ["scheduler/cosin", "cosine", "plateau", "step", "none"]),
        (["trainer.max_epoch=3"], ["max_epoch"]),
        (["trainer.learning_rate=-1"], ["learning_rate=-1.0", "> 0"]),
        (["trainer.mixed_precision=fp8"], ["mixed_precision='fp8'", "'off'", "'bf16'", "'fp16'"]),
        (["trainer.optimizer=sgd"], ["optimizer=adamw", "'optimizer' group"]),
        (["trainer.lr_scheduler=step"], ["scheduler=plateau", "'scheduler' group"]),
        (["+scheduler.T_max=4"], ["T_max=4", "its horizon is set by the Trainer", "remove T_max"]),
        (["scheduler=step", "+scheduler.gama=0.5"], ["StepLR has no argument 'gama'", "gamma"]),
        (["+optimizer.betas_typo=1"], ["Adam has no argument 'betas_typo'", "betas"]),
        (["trainer.scheduler_horizon=max_time"], ["scheduler_horizon='max_time'", "max_time is None"]),
        (["trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
    ],
)
def test_bad_input_stops_before_training(tmp_path, args, expected):
    result = run(["experiment=smoke", "hydra.run.dir=run", *args], tmp_path)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    assert "Traceback" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_help_and_cfg_job(tmp_path):
    help_text = ok(run(["--help"], tmp_path)).stdout
    for line in (
        "optimizer: adam, adamw, sgd",
        "scheduler: cosine, none, plateau, step",
        "logger: none, tensorboard",
        "hparams_search: optuna",
    ):
        assert line in help_text
    assert "smoke" in next(line for line in help_text.splitlines() if line.startswith("experiment: "))
    composed = yaml.safe_load(ok(run(["--cfg", "job", "experiment=smoke", "optimizer=sgd"], tmp_path)).stdout)
    assert composed["trainer"]["max_epochs"] == 2
    assert composed["optimizer"]["_target_"] == "torch.optim.SGD"
    assert not (tmp_path / "outputs").exists()


def test_user_config_dir_adds_options(tmp_path):
    """A user's own --config-dir adds a group option next to the shipped ones."""
    user_conf = tmp_path / "my_conf" / "optimizer"
    user_conf.mkdir(parents=True)
    (user_conf / "radam.yaml").write_text(
        "_target_: torch.optim.RAdam\n_partial_: true\nlr: ${trainer.learning_rate}\n"
    )
    ok(
        run(
            [
                "--config-dir",
                "my_conf",
                "optimizer=radam",
                "experiment=smoke",
                "trainer.max_epochs=1",
                "hydra.run.dir=run",
            ],
            tmp_path,
        )
    )
    assert load(tmp_path / "run/checkpoints/last.pt")["optimizer_class"] == "RAdam"


def test_installed_wheel_runs_from_another_directory(tmp_path):
    """A regular (non-editable) wheel carries its configs: run it with the source tree out of reach."""
    repo = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(repo)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    wheel = next((tmp_path / "wheel").glob("mlff_distiller-*.whl"))
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    assert (tmp_path / "site/mlff_distiller/conf/train.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run(
        [sys.executable, "-c", "import mlff_distiller; print(mlff_distiller.__file__)"],
        cwd=elsewhere,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(tmp_path / "site"))
    ok(
        run(
            ["experiment=smoke", "trainer.max_epochs=1", "hydra.run.dir=run"],
            elsewhere,
            env=env,
            command=[sys.executable, "-m", "mlff_distiller.train"],
        )
    )
    assert (elsewhere / "run/metrics.json").is_file()
