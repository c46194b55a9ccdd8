"""Data errors name the file, the structure and the key, in one sentence of our own, before any work."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlff_distiller.data import dataset as dataset_module
from mlff_distiller.data.dataset import AtomsDataset, DataError, read_labelled_structures
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.training import CheckpointError, load_checkpoint_file


def _cell(seed: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions += np.random.default_rng(seed).normal(0, 0.05, atoms.positions.shape)
    atoms.calc = EMT()
    atoms.get_potential_energy()
    return atoms


def _broken(atoms, change):
    atoms = atoms.copy()
    change(atoms)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    return atoms


def _set_nan(atoms):
    atoms.positions[1, 2] = np.nan


def _flatten_cell(atoms):
    atoms.cell[2] = atoms.cell[0]


@pytest.mark.parametrize(
    "change,expected",
    [
        (_set_nan, r"structure 2 of '.*bad\.extxyz': positions of atom\(s\) \[1\] are not finite"),
        (_flatten_cell, r"structure 2 of '.*bad\.extxyz': periodic .* has zero volume"),
    ],
)
def test_bad_geometry_names_file_structure_and_key(tmp_path, change, expected):
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, [_cell(0), _cell(1), _broken(_cell(2), change)])
    with pytest.raises(DataError, match=expected):
        read_labelled_structures(path)


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match=r"Data file '.*' is a directory; give one ASE-readable file"):
        read_labelled_structures(tmp_path)


@pytest.mark.parametrize("cutoff", [-1.0, 0.0, float("nan"), "five"])
def test_an_invalid_cutoff_names_the_cutoff_key(tmp_path, cutoff):
    path = tmp_path / "ok.extxyz"
    ase.io.write(path, [_cell(k) for k in range(4)])
    with pytest.raises(DataError, match=r"cutoff=.* is invalid: .*> 0 .*top-level `cutoff` key"):
        AtomsDataModule(path=str(path), cutoff=cutoff, num_val=1, num_test=1)


def test_a_neighbour_list_failure_names_the_structure(monkeypatch):
    structures = [_cell(0), _cell(1)]
    for atoms in structures:
        atoms.info["_energy"], atoms.arrays["_forces"] = atoms.get_potential_energy(), atoms.get_forces()

    def failing(positions, cell, pbc, cutoff):
        raise RuntimeError("library says no")

    monkeypatch.setattr(dataset_module, "neighbor_list", failing)
    with pytest.raises(DataError, match=r"structure 0 of 'x\.extxyz': .*cutoff=3\.0 .*library says no"):
        AtomsDataset(structures, 3.0, source="'x.extxyz'")


def test_a_file_that_is_not_a_checkpoint_gets_our_sentence_only(tmp_path):
    path = tmp_path / "structures.extxyz"
    ase.io.write(path, [_cell(0)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message and "could not be read" in message
    assert "weights_only" not in message and "torch.load" not in message  # torch's unsafe advice stays out
    assert info.value.__cause__ is None
