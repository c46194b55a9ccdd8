"""Grouped splits keep correlated structures (one MD run) on one side of the train/val/test split."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from mlff_distiller.data.module import AtomsDataModule


def write_runs(path, runs: int = 12, per_run: int = 5, singles: int = 20):
    structures = []
    rng = np.random.default_rng(0)
    for index in range(runs * per_run + singles):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        if index < runs * per_run:
            atoms.info["md_run"] = index // per_run
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(4, 3)))
        structures.append(atoms)
    write(path, structures, format="extxyz")
    return structures


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_md_run_is_split_across_train_val_test(tmp_path, seed):
    structures = write_runs(tmp_path / "runs.extxyz")
    data = AtomsDataModule(
        path=str(tmp_path / "runs.extxyz"), cutoff=3.0, num_val=10, num_test=15, seed=seed, group_key="md_run"
    )
    side = {}
    for name, indices in data.split_indices.items():
        for index in indices:
            run = structures[index].info.get("md_run")
            if run is not None:
                assert side.setdefault(run, name) == name, f"md_run {run} is in {side[run]} and {name}"
    everything = sorted(i for indices in data.split_indices.values() for i in indices)
    assert everything == list(range(len(structures)))
    assert 10 <= len(data.split_indices["val"]) < 10 + 5  # overshoot by less than one group
    assert 15 <= len(data.split_indices["test"]) < 15 + 5


def test_ungrouped_split_mixes_runs(tmp_path):
    """Without group_key the same file does put snapshots of one run on both sides (what grouping prevents)."""
    structures = write_runs(tmp_path / "runs.extxyz")
    data = AtomsDataModule(path=str(tmp_path / "runs.extxyz"), cutoff=3.0, num_val=10, num_test=15, seed=0)
    sides: dict[int, set[str]] = {}
    for name, indices in data.split_indices.items():
        for index in indices:
            if "md_run" in structures[index].info:
                sides.setdefault(structures[index].info["md_run"], set()).add(name)
    assert any(len(names) > 1 for names in sides.values())
    assert (len(data.split_indices["val"]), len(data.split_indices["test"])) == (10, 15)
