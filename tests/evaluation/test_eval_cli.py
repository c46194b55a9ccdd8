"""`mlff-eval` and the data errors of `mlff-train`, run as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from evalkit import CUTOFF, mixed_structures, write_mixed

BIN = Path(sys.executable).parent
MLFF_TRAIN = str(BIN / "mlff-train") if (BIN / "mlff-train").exists() else shutil.which("mlff-train")
MLFF_EVAL = str(BIN / "mlff-eval") if (BIN / "mlff-eval").exists() else shutil.which("mlff-eval")
pytestmark = pytest.mark.skipif(MLFF_EVAL is None, reason="mlff-eval is not installed (pip install -e .)")
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
TINY = ["model.hidden=16", "model.interactions=1", "trainer.max_epochs=1", "trainer.batch_size=4", "logger=none"]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny student trained by mlff-train on three predefined files of mixed sizes (clusters and cells)."""
    directory = tmp_path_factory.mktemp("eval_cli")
    for name, count, seed in (("train", 12, 1), ("val", 4, 2), ("test", 7, 3)):
        write_mixed(directory / f"{name}.extxyz", count, seed)
    data = ["data=file", "data.path=train.extxyz", "data.val_path=val.extxyz", "data.test_path=test.extxyz"]
    ok(finish(start([MLFF_TRAIN, *data, f"cutoff={CUTOFF}", *TINY, "hydra.run.dir=run"], directory)))
    return directory


def test_mlff_eval_reproduces_the_test_metrics_of_mlff_train(trained):
    result = ok(finish(start([MLFF_EVAL, "ckpt_path=run", "data.path=test.extxyz", "hydra.run.dir=ev"], trained)))
    train_metrics = json.loads((trained / "run/metrics.json").read_text())
    eval_metrics = json.loads((trained / "ev/metrics.json").read_text())
    assert eval_metrics["checkpoint"] == str((trained / "run/checkpoints/best_model.pt").resolve())
    assert eval_metrics["ema_weights"] is True and eval_metrics["eval/num_structures"] == 7
    # mlff-train reports per element and per config type too; mlff-eval reproduces every test figure.
    expected = {k: v for k, v in train_metrics.items() if k.startswith("test/") and k != "test/loss"}
    assert {"test/force_mae/Cu", "test/force_mae/Au", "test/force_mae/config_type=cluster85"} <= set(expected)
    for name, value in expected.items():
        assert eval_metrics["eval/" + name.removeprefix("test/")] == pytest.approx(value, rel=1e-5), name
    assert "eval/force_mae/config_type=bulk" in result.stderr + result.stdout  # the printed table
    written = ase.io.read(trained / "ev/predictions.extxyz", ":")
    original = ase.io.read(trained / "test.extxyz", ":")
    assert [len(a) for a in written] == [len(a) for a in original] == [19, 44, 85, 32, 19, 44, 85]
    for back, atoms in zip(written, original):
        assert back.info["label_energy"] == pytest.approx(atoms.get_potential_energy())
        assert back.arrays["predicted_forces"].shape == (len(atoms), 3)
    force_errors = np.concatenate([a.arrays["predicted_forces"] - a.arrays["label_forces"] for a in written])
    assert 1e3 * np.abs(force_errors).mean() == pytest.approx(eval_metrics["eval/force_mae"], rel=1e-4)
    assert (trained / "ev/parity.png").stat().st_size > 10_000


def test_help_and_composed_config(tmp_path):
    help_text = ok(finish(start([MLFF_EVAL, "--help"], tmp_path))).stdout
    assert "mlff-eval: evaluate a trained student" in help_text and "ckpt_path" in help_text
    assert "optimizer" not in help_text  # the training groups are not offered
    composed = yaml.safe_load(ok(finish(start([MLFF_EVAL, "--cfg", "job", "data.path=x.xyz"], tmp_path))).stdout)
    assert composed["data"]["path"] == "x.xyz" and composed["ckpt_path"] == "???"
    assert not (tmp_path / "outputs").exists()


def _files_with_errors(directory: Path) -> None:
    good = mixed_structures(4, seed=11)
    ase.io.write(directory / "good.extxyz", good)
    nan = [atoms.copy() for atoms in good]
    nan[2].positions[5, 1] = np.nan
    for atoms, source in zip(nan, good):
        atoms.calc = source.calc
    ase.io.write(directory / "nan.extxyz", nan)
    silver = bulk("Ag", "fcc", a=4.09, cubic=True).repeat((2, 2, 2))
    silver.calc = EMT()
    silver.get_potential_energy()
    ase.io.write(directory / "silver.extxyz", good[:2] + [silver])
    (directory / "a_directory").mkdir()


def test_each_bad_input_is_one_paragraph_with_exit_code_2(trained, tmp_path):
    """Data, element and checkpoint errors: exit code 2, one line naming file / structure / key, no traceback,
    no run started. The commands run side by side (each is seconds of imports)."""
    _files_with_errors(tmp_path)
    run = str(trained / "run")
    train = [MLFF_TRAIN, "data=file", *TINY]
    cases = {
        "nan": (
            [*train, "data.path=nan.extxyz", "hydra.run.dir=r_nan"],
            ["structure 2 of 'nan.extxyz'", "positions of atom(s) [5]", "not finite"],
        ),
        "cutoff": (
            [*train, "data.path=good.extxyz", "cutoff=-1", "hydra.run.dir=r_cutoff"],
            ["cutoff=-1 is invalid", "`cutoff`"],
        ),
        "directory": (
            [*train, "data.path=a_directory", "hydra.run.dir=r_dir"],
            ["'a_directory' is a directory"],
        ),
        "element_in_test_only": (
            [*train, "data.path=good.extxyz", "data.test_path=silver.extxyz", "data.num_val=1", "hydra.run.dir=r_ag"],
            ["The test split ('silver.extxyz') holds Ag (structure 2)", "absent from the training split"],
        ),
        "eval_unknown_element": (
            [MLFF_EVAL, f"ckpt_path={run}", "data.path=silver.extxyz", "hydra.run.dir=e_ag"],
            ["'silver.extxyz' (structure 2 of 3) contains Ag", "never trained on", "knows only Cu, Au"],
        ),
        "eval_not_a_checkpoint": (
            [MLFF_EVAL, "ckpt_path=good.extxyz", "data.path=good.extxyz", "hydra.run.dir=e_ckpt"],
            ["Checkpoint 'good.extxyz' could not be read", "not a mlff_distiller checkpoint"],
        ),
    }
    processes = {name: start(command, tmp_path) for name, (command, _) in cases.items()}
    for name, process in processes.items():
        result = finish(process)
        message = result.stdout + result.stderr
        assert result.returncode == 2, f"{name}: exit {result.returncode}\n{message}"
        for text in cases[name][1]:
            assert text in message, f"{name}: {text!r} not in:\n{message}"
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, f"{name}: {result.stderr}"  # one paragraph
        assert "Traceback" not in message and "weights_only" not in message, name
    for name in ("r_nan", "r_cutoff", "r_dir", "r_ag"):
        assert not (tmp_path / name / "checkpoints").exists()
    for name in ("e_ag", "e_ckpt"):
        assert not (tmp_path / name / "metrics.json").exists()
