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


@pytest.mark.parametrize("group_key", [None, "md_run"])
def test_train_only_structures_are_trained_on_and_the_others_split_as_without_them(tmp_path, group_key):
    """Flagged structures (the sampler's contact copies) are never drawn; the validation and test splits of the
    others are exactly those of the file without them; a flagged one is trained on unless it is derived from a
    held-out structure (a near-twin of it), whatever the seed and the position in the file."""
    structures = write_runs(tmp_path / "plain.extxyz")
    for k, atoms in enumerate(structures):
        atoms.info["provenance"] = f"structure {k}"
    write(tmp_path / "plain.extxyz", structures, format="extxyz")
    rng = np.random.default_rng(1)
    mixed, derived = [], {}
    for k, atoms in enumerate(structures):
        mixed.append(atoms)
        if k % 2 == 0:  # a copy of every other structure, right after it
            copy = atoms.copy()
            copy.info = {"train_only": True, "derived_from": f"structure {k}", "md_run": 0}  # even in a group
            copy.calc = SinglePointCalculator(copy, energy=float(rng.normal()), forces=rng.normal(size=(4, 3)))
            derived[len(mixed)] = k
            mixed.append(copy)
    write(tmp_path / "mixed.extxyz", mixed, format="extxyz")
    plain_index = {i: k for k, i in enumerate(i for i in range(len(mixed)) if i not in derived)}
    for seed in (0, 1, 2):
        options = {"cutoff": 3.0, "num_val": 10, "num_test": 15, "seed": seed, "group_key": group_key}
        plain_module = AtomsDataModule(path=str(tmp_path / "plain.extxyz"), **options)
        module = AtomsDataModule(path=str(tmp_path / "mixed.extxyz"), **options)
        plain, data = plain_module.split_indices, module.split_indices
        # The students' statistics come from the trained structures that are not train-only.
        expected = plain_module.statistics.to_dict()
        got = module.statistics.to_dict()
        assert got["num_structures"] == expected["num_structures"] == len(plain["train"])
        assert got["force_rms"] == pytest.approx(expected["force_rms"], rel=1e-12)
        assert got["atomic_energies"] == pytest.approx(expected["atomic_energies"], rel=1e-9)
        for name in ("val", "test", "train"):
            assert sorted(plain_index[i] for i in data[name] if i not in derived) == sorted(plain[name])
        held_out = set(plain["val"]) | set(plain["test"])
        trained = {i for i in data["train"] if i in derived}
        assert trained == {i for i, k in derived.items() if k not in held_out}
        assert 0 < len(trained) < len(derived) and not set(derived) & (set(data["val"]) | set(data["test"]))
