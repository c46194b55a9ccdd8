"""`read_labelled_structures`: labels survive every ASE format the docs name, come from configurable
keys, and every unusable file or structure fails with a DataError that says where."""

from __future__ import annotations

import re

import ase.io
import numpy as np
import pytest
from datakit import alloy_cell, cluster, emt_labelled, mixed_structures, with_labels

from mlff_distiller.data.dataset import DataError, read_labelled_structures


@pytest.fixture(scope="module")
def emt_set():
    return emt_labelled(mixed_structures())


@pytest.mark.parametrize("suffix", ["extxyz", "traj", "db"])
def test_emt_labels_round_trip_through_each_format(tmp_path, emt_set, suffix):
    structures, energies, forces = emt_set
    path = tmp_path / f"labelled.{suffix}"
    ase.io.write(path, structures)
    read = read_labelled_structures(path)
    assert len(read) == len(structures)
    for atoms, original, energy, force in zip(read, structures, energies, forces):
        assert atoms.get_chemical_symbols() == original.get_chemical_symbols()
        np.testing.assert_allclose(atoms.positions, original.positions, atol=1e-6)
        assert atoms.pbc.tolist() == original.pbc.tolist()
        np.testing.assert_allclose(atoms.cell.array, original.cell.array, atol=1e-6)
        assert atoms.info["_energy"] == pytest.approx(energy, abs=1e-6)
        assert atoms.arrays["_forces"].dtype == np.float64
        np.testing.assert_allclose(atoms.arrays["_forces"], force, atol=1e-6, rtol=0)
    # The set really mixes periodic cells and a free cluster, and its forces are not trivial.
    assert {tuple(a.pbc) for a in read} == {(True,) * 3, (False,) * 3}
    assert min(np.abs(f).max() for f in forces) > 1e-2


def test_an_index_selects_structures(tmp_path, emt_set):
    structures, energies, _ = emt_set
    path = tmp_path / "labelled.extxyz"
    ase.io.write(path, structures)
    read = read_labelled_structures(path, index="1:3")
    assert [a.info["_energy"] for a in read] == pytest.approx(energies[1:3], abs=1e-6)


def test_labels_from_configurable_info_and_arrays_keys(tmp_path, emt_set):
    structures, energies, forces = emt_set
    plain = []
    for atoms, energy, force in zip(structures, energies, forces):
        atoms = atoms.copy()  # no calculator: the labels live only under custom names
        atoms.calc = None
        atoms.info["my_E"] = energy
        atoms.new_array("my_F", force)
        plain.append(atoms)
    path = tmp_path / "custom.extxyz"
    ase.io.write(path, plain)
    read = read_labelled_structures(path, energy_key="my_E", forces_key="my_F")
    for atoms, energy, force in zip(read, energies, forces):
        assert atoms.info["_energy"] == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["_forces"], force, atol=1e-6, rtol=0)
    # Without the keys the same file has no calculator labels, and the error points at the keys.
    with pytest.raises(DataError, match=r"structure 0 of .*custom\.extxyz.*energy_key.*my_E"):
        read_labelled_structures(path)


def _write(path, structures):
    ase.io.write(path, structures)
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_labelled_structures(path, **kwargs)
    return str(info.value)


def _good(n=2):
    labelled, _, _ = emt_labelled([alloy_cell(10 + k) for k in range(n)])
    return labelled


def test_missing_info_key_names_file_index_and_available_keys(tmp_path):
    structures = []
    for k, atoms in enumerate(_good(3)):
        atoms = atoms.copy()
        atoms.calc = None
        atoms.info["tag"] = k
        if k != 2:
            atoms.info["my_E"] = -1.0
        atoms.new_array("my_F", np.zeros((len(atoms), 3)))
        structures.append(atoms)
    path = _write(tmp_path / "keys.extxyz", structures)
    message = _error(path, energy_key="my_E", forces_key="my_F")
    assert "structure 2" in message and "keys.extxyz" in message
    assert "my_E" in message and "tag" in message  # the wanted key and what is there instead

    message = _error(path, energy_key="tag", forces_key="nope")
    assert "structure 0" in message and "keys.extxyz" in message
    assert "nope" in message and "my_F" in message and "positions" in message


def test_structure_without_forces(tmp_path):
    good = _good()
    broken = with_labels(alloy_cell(7), energy=-3.0, forces=None)
    path = _write(tmp_path / "no_forces.extxyz", [*good, broken])
    message = _error(path)
    assert "structure 2" in message and "no_forces.extxyz" in message and "forces" in message


@pytest.mark.parametrize("what", ["nan_energy", "inf_energy", "nan_force", "inf_force"])
def test_non_finite_labels(tmp_path, what):
    atoms = alloy_cell(8)
    forces = np.ones((len(atoms), 3))
    energy = {"nan_energy": np.nan, "inf_energy": np.inf}.get(what, -2.0)
    if what == "nan_force":
        forces[1, 2] = np.nan
    if what == "inf_force":
        forces[3, 0] = -np.inf
    path = _write(tmp_path / f"{what}.extxyz", [*_good(), with_labels(atoms, energy, forces)])
    message = _error(path)
    assert "structure 2" in message and f"{what}.extxyz" in message
    assert re.search(r"not finite|NaN", message)


def test_wrong_forces_shape(tmp_path):
    structures = []
    for k, atoms in enumerate(_good(3)):
        atoms = atoms.copy()
        atoms.calc = None
        atoms.info["E"] = -1.0
        atoms.new_array("F", np.zeros((len(atoms), 2 if k == 2 else 3)))
        structures.append(atoms)
    path = _write(tmp_path / "shape.extxyz", structures)
    message = _error(path, energy_key="E", forces_key="F")
    assert "structure 2" in message and "shape.extxyz" in message
    assert "(4, 2)" in message and "(4, 3)" in message


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.extxyz", b"this is not\nan extended xyz file\n@@@\n"),
        ("garbage.traj", bytes(range(256)) * 4),
        ("garbage.db", b"SQLite format 3? no, just text\n" * 10),
        ("garbage.xyz", b"3\ncomment\nCu 0 0\n"),
        ("garbage.unknownext", b"1\n\nCu 0 0 0\n"),
    ],
)
def test_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    message = _error(path)
    assert name in message and "could not be read" in message


def test_nonexistent_file(tmp_path):
    message = _error(tmp_path / "missing.extxyz")
    assert "missing.extxyz" in message and "does not exist" in message
    message = _error(tmp_path)  # a directory is not a data file either
    assert str(tmp_path) in message


@pytest.mark.parametrize("suffix", ["extxyz", "traj", "db"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty.{suffix}"
    path.write_bytes(b"")
    message = _error(path)
    assert f"empty.{suffix}" in message


def test_database_without_rows(tmp_path):
    import ase.db

    path = tmp_path / "rows.db"
    with ase.db.connect(path) as db:
        db.write(cluster(0))
        db.delete([1])
    message = _error(path)
    assert "rows.db" in message and "no structures" in message


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.extxyz"
    path.write_text("\n\n")
    message = _error(path)
    assert "blank.extxyz" in message and "no structures" in message
