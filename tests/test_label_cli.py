"""`mlff-label` run as a user runs it: a real subprocess labelling a small file, shards as a Hydra
multirun (what a cluster launcher runs, one job per shard), errors with exit code 2, and the shard of a
torchrun process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
from ase.calculators.emt import EMT
from hydra import compose, initialize_config_module

from mlff_distiller.label import LabelCLIError, label, shard_from_environment
from mlff_distiller.teachers import generate_alloy_structures, label_structures
from mlff_distiller.teachers.labelling import IncompleteShardsError, labelling_cost

BIN = Path(sys.executable).parent
MLFF_LABEL = str(BIN / "mlff-label") if (BIN / "mlff-label").exists() else shutil.which("mlff-label")
pytestmark = pytest.mark.skipif(MLFF_LABEL is None, reason="mlff-label is not installed (pip install -e .)")


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([MLFF_LABEL, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=240)


def test_a_multirun_over_shards_writes_the_serial_file(tmp_path):
    structures = generate_alloy_structures(5, seed=2, snapshots_per_run=3)
    ase.io.write(tmp_path / "structures.extxyz", structures)
    options = ["hessian_rows=1", "site_energies=true", "progress=false"]
    args = ["-m", "input=structures.extxyz", "output=labels.extxyz", "num_shards=2", "shard_index=1,0", *options]
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = label_structures(
        ase.io.read(tmp_path / "structures.extxyz", ":"),
        EMT(),
        tmp_path / "reference.extxyz",
        hessian_rows=1,
        site_energies=True,
        progress=False,
    )
    assert (tmp_path / "labels.extxyz").read_bytes() == reference.read_bytes()
    assert labelling_cost(tmp_path / "labels.extxyz")["teacher_calls"] == 5 * 3
    assert not list(tmp_path.glob("*shard*"))

    result = run(["input=missing.extxyz", "output=x.extxyz"], tmp_path)
    assert result.returncode == 2 and "input='missing.extxyz' does not exist" in result.stderr


def test_merging_unfinished_shards_names_them(tmp_path):
    ase.io.write(tmp_path / "structures.extxyz", generate_alloy_structures(3, seed=2, snapshots_per_run=3))
    overrides = [f"input={tmp_path / 'structures.extxyz'}", f"output={tmp_path / 'labels.extxyz'}", "progress=false"]
    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        shard = compose("label", overrides=[*overrides, "num_shards=3", "shard_index=1"])
        merge = compose("label", overrides=[*overrides, "num_shards=3"])
    assert label(shard).name == "labels.shard-0001-of-0003.extxyz"
    with pytest.raises(IncompleteShardsError, match=r"2 of 3 shards are unfinished: shard 0 .*; shard 2 "):
        label(merge)


def test_each_torchrun_process_takes_the_shard_of_its_rank(monkeypatch):
    assert shard_from_environment(4, 2) == (4, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_environment(1, None) == (3, 1)
    with pytest.raises(LabelCLIError, match="leave shard_index"):
        shard_from_environment(3, 0)
