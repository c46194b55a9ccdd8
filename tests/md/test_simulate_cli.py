"""`mlff-md` as a user runs it: output files and summary, a restart that continues the run exactly, exit code 2
with the install hint for a missing engine package (and for other bad input), exit code 4 when the MD
explodes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from md_kit import alloy, student_checkpoint
from omegaconf import OmegaConf

from mlff_distiller.cli import CLIError
from mlff_distiller.md.engines import ENGINES, engine_available, make_engine
from mlff_distiller.simulate import simulate

BIN = Path(sys.executable).parent
MLFF_MD = str(BIN / "mlff-md") if (BIN / "mlff-md").exists() else shutil.which("mlff-md")
pytestmark = pytest.mark.skipif(MLFF_MD is None, reason="mlff-md is not installed (pip install -e .)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("md_cli")
    ase.io.write(directory / "start.extxyz", alloy(seed=8))
    return directory, student_checkpoint(directory)


def mlff_md(directory: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [MLFF_MD, *overrides], cwd=directory, env=environment, capture_output=True, text=True, timeout=300
    )


def compose_md(output_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        return compose("md", overrides=[f"paths.output_dir={output_dir}", *overrides])


def test_a_run_writes_thermo_trajectory_and_summary_and_resumes_exactly(inputs):
    directory, checkpoint = inputs
    start = f"structure={directory / 'start.extxyz'}"
    common = [f"ckpt_path={checkpoint}", start, "dtype=float64", "thermo_interval=5", "write_interval=10",
              "timestep_fs=1.0", "temperature_K=500"]  # fmt: skip
    result = mlff_md(directory, *common, "steps=20", "hydra.run.dir=first")
    assert result.returncode == 0, result.stderr
    first = directory / "first"
    with open(first / "thermo.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [0, 5, 10, 15, 20]
    assert all(np.isfinite(float(row["pressure_GPa"])) for row in rows)  # a periodic cell: a pressure
    frames = ase.io.read(first / "trajectory.extxyz", ":")
    assert [frame.info["step"] for frame in frames] == [0, 10, 20]
    summary = json.loads((first / "summary.json").read_text())
    assert summary["md/stable"] == 1.0 and summary["md/steps"] == 20 and summary["md/ns_per_day"] > 0
    assert summary["md/atom_steps_per_s"] > 0 and abs(summary["md/energy_drift"]) < 50
    assert summary["md/min_distance"] > 1.5

    # Continue to 40 steps from the restart file; the same 40 steps in one go must end in the same state.
    resumed = mlff_md(directory, *common, "steps=40", f"restart={directory / 'first'}", "hydra.run.dir=second")
    assert resumed.returncode == 0, resumed.stderr
    end = ase.io.read(directory / "second" / "restart.traj")
    straight = simulate(compose_md(directory / "straight", *common, "steps=40"))
    assert end.info["step"] == straight.steps == 40
    assert np.abs(end.positions - alloy(seed=8).positions).max() > 0.01
    np.testing.assert_allclose(end.positions, straight.final.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(end.get_momenta(), straight.final.get_momenta(), rtol=0, atol=1e-10)


def test_a_missing_engine_package_names_the_extra_before_any_work(inputs, tmp_path):
    directory, checkpoint = inputs
    fake = tmp_path / "site" / "openmm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named openmm (simulated)')\n")
    result = mlff_md(
        directory, f"ckpt_path={checkpoint}", "structure=start.extxyz", "engine=openmm", "hydra.run.dir=missing",
        env={"PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert result.returncode == 2
    assert 'pip install "mlff-distiller[openmm]"' in result.stderr
    assert not (directory / "missing" / "thermo.csv").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("timestep_fs=-1", "timestep_fs=-1"),
        ("structure=nowhere.xyz", "nowhere.xyz"),
        ("write_interval=7", "write_interval=7"),
        ("ensemble=npt", "ensemble='npt'"),
        ("dtype=float16", "dtype='float16'"),
        ("supercell=[2,2]", "supercell=[2, 2]"),
        ("engine=torchsim", "mlff-distiller[torchsim]"),
        ("pair_min_distance={Cu-Xx:1.0}", "'Cu-Xx' is not an element pair"),
    ],
)
def test_bad_input_is_named_before_any_work(inputs, tmp_path, monkeypatch, override, message):
    directory, checkpoint = inputs
    monkeypatch.setitem(sys.modules, "torch_sim", None)  # as if torch-sim were not installed
    with pytest.raises(CLIError) as info:
        simulate(compose_md(tmp_path, f"ckpt_path={checkpoint}", f"structure={directory / 'start.extxyz'}", override))
    assert message in str(info.value)
    assert not (tmp_path / "thermo.csv").exists()


def test_an_unseen_element_is_refused_before_any_work(inputs):
    directory, checkpoint = inputs
    atoms = alloy(seed=8)
    atoms.numbers[0] = 47
    ase.io.write(directory / "silver.extxyz", atoms)
    with pytest.raises(CLIError, match="contains Ag, which the student was never trained on"):
        simulate(compose_md(directory / "ag", f"ckpt_path={checkpoint}", f"structure={directory / 'silver.extxyz'}"))


def test_an_exploding_run_stops_with_exit_code_4(inputs):
    directory, checkpoint = inputs
    result = mlff_md(
        directory, f"ckpt_path={checkpoint}", "structure=start.extxyz", "timestep_fs=40", "temperature_K=3000",
        "steps=400", "thermo_interval=5", "write_interval=5", "hydra.run.dir=boom",
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "MD became unstable and was stopped" in result.stderr
    summary = json.loads((directory / "boom" / "summary.json").read_text())
    assert summary["md/stable"] == 0.0 and summary["md/steps"] < 400 and summary["md/reason"]


def test_a_pair_bound_stops_the_run_with_exit_code_4_naming_the_pair(inputs):
    directory, checkpoint = inputs
    # Au-Au neighbours of the fcc cell are ~2.6 Å apart: a 3 Å bound for that pair alone is broken at once.
    result = mlff_md(
        directory, f"ckpt_path={checkpoint}", "structure=start.extxyz", "steps=20", "pair_min_distance={Au-Au:3.0}",
        "hydra.run.dir=pairs",
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "(Au-Au) came" in result.stderr and "closer than the Au-Au bound of 3.000 Å" in result.stderr


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_config_composes_and_builds_its_engine(tmp_path, engine):
    cfg = compose_md(tmp_path, "ckpt_path=x.pt", "structure=y.xyz", f"engine={engine}")
    assert cfg.engine.name == engine
    if engine_available(engine):
        make_engine(engine, **OmegaConf.to_container(cfg.engine.options))


def test_the_export_config_composes(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        cfg = compose("export", overrides=["ckpt_path=x.pt", f"output={tmp_path / 'student.pt'}"])
    assert cfg.dtype == "float32" and cfg.output.endswith("student.pt")
