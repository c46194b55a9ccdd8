"""Hessian rows in the data path: read from labelled files, one structure's graph, batches of structures of
different sizes (some without rows)."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from datakit import alloy_cell, cluster, emt_labelled

from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import AtomsDataset, DataError, read_labelled_structures
from mlff_distiller.teachers.hessian import store_hessian_rows

CUTOFF = 4.0


def _with_rows(atoms, coords, seed):
    rows = np.random.default_rng(seed).normal(size=(len(coords), 3 * len(atoms)))
    store_hessian_rows(atoms, np.asarray(coords), rows)
    return rows


@pytest.fixture
def labelled_file(tmp_path):
    """4 atoms with 2 rows, 6-atom cluster without rows, 8 atoms with 1 row."""
    structures, _, _ = emt_labelled([alloy_cell(0), cluster(1), alloy_cell(2, (2, 1, 1))])
    rows = [_with_rows(structures[0], [1, 10], 0), None, _with_rows(structures[2], [23], 1)]
    path = tmp_path / "rows.extxyz"
    ase.io.write(path, structures)
    return path, rows


def test_rows_are_read_and_batched_across_sizes(labelled_file):
    path, rows = labelled_file
    structures = read_labelled_structures(path)
    dataset = AtomsDataset(structures, CUTOFF)
    assert keys.HESSIAN_ROWS not in dataset[1]
    assert dataset[0][keys.HESSIAN_ROWS].shape == (2, 12) and dataset[2][keys.HESSIAN_ROWS].shape == (1, 24)
    batch = collate_atoms([dataset[i] for i in range(3)])
    # Batch atoms: 0-3 structure 0, 4-9 the cluster, 10-17 structure 2.
    assert batch[keys.HESSIAN_ROW_COORD].tolist() == [1, 10, 3 * 10 + 23]
    assert batch[keys.HESSIAN_ROWS].shape == (2 * 12 + 24,)
    expected_rows = [0] * 12 + [1] * 12 + [2] * 24
    assert batch[keys.HESSIAN_ENTRY_ROW].tolist() == expected_rows
    expected_coords = list(range(12)) * 2 + list(range(30, 54))
    assert batch[keys.HESSIAN_ENTRY_COORD].tolist() == expected_coords
    values = batch[keys.HESSIAN_ROWS].double().numpy()
    np.testing.assert_allclose(values[:24], rows[0].reshape(-1), atol=1e-6)
    np.testing.assert_allclose(values[24:], rows[2].reshape(-1), atol=1e-6)
    # A dense check: scatter the entries into the batch's (rows, 3N) matrix and compare blocks.
    dense = torch.zeros(3, 3 * 18, dtype=torch.float64)
    dense[batch[keys.HESSIAN_ENTRY_ROW], batch[keys.HESSIAN_ENTRY_COORD]] = batch[keys.HESSIAN_ROWS].double()
    np.testing.assert_allclose(dense[2, 30:].numpy(), rows[2][0], atol=1e-6)
    assert dense[:2, 12:].abs().sum() == 0 and dense[2, :30].abs().sum() == 0


def test_batches_without_rows_have_no_hessian_keys(labelled_file):
    path, _ = labelled_file
    dataset = AtomsDataset(read_labelled_structures(path), CUTOFF)
    batch = collate_atoms([dataset[1], dataset[1]])
    assert not set(keys.HESSIAN_KEYS) & set(batch)
    assert batch.to("cpu", torch.float64)[keys.ENERGY].dtype == torch.float64
    only_rows = collate_atoms([dataset[2]]).to("cpu", torch.float64)
    assert only_rows[keys.HESSIAN_ROWS].dtype == torch.float64 and only_rows[keys.HESSIAN_ROW_COORD].dtype == torch.long


def test_inconsistent_rows_are_refused(tmp_path):
    structures, _, _ = emt_labelled([alloy_cell(0)])
    atoms = structures[0]
    _with_rows(atoms, [1, 2], 0)
    atoms.info["hessian_row_index"] = np.array([1, 2, 3])
    ase.io.write(tmp_path / "bad.extxyz", atoms)
    with pytest.raises(DataError, match=r"structure 0 of .*3 Hessian row indices but .* 6 columns"):
        read_labelled_structures(tmp_path / "bad.extxyz")
    atoms.info["hessian_row_index"] = np.array([1, 12])
    ase.io.write(tmp_path / "range.extxyz", atoms)
    with pytest.raises(DataError, match=r"not all in \[0, 12\)"):
        read_labelled_structures(tmp_path / "range.extxyz")
