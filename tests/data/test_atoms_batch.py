"""`collate_atoms`, `AtomsBatch` and `edge_vectors` on structures of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datakit import alloy_cell, cluster, emt_labelled, triclinic_gold

from mlff_distiller.data import keys
from mlff_distiller.data.batch import AtomsBatch, collate_atoms, edge_vectors
from mlff_distiller.data.dataset import atoms_to_graph
from mlff_distiller.training.trainer import infer_batch_size

CUTOFF = 4.0


@pytest.fixture(scope="module")
def structures():
    labelled, _, _ = emt_labelled([alloy_cell(0), cluster(1), triclinic_gold(2), alloy_cell(3, (2, 1, 1))])
    for atoms in labelled:
        atoms.info["_energy"] = atoms.get_potential_energy()
        atoms.arrays["_forces"] = atoms.get_forces()
    return labelled


@pytest.fixture(scope="module")
def graphs(structures):
    return [atoms_to_graph(atoms, CUTOFF) for atoms in structures]


def test_collate_concatenates_and_offsets(structures, graphs):
    batch = collate_atoms(graphs)
    sizes = [len(a) for a in structures]
    assert sizes == [4, 6, 4, 8]
    n, s = sum(sizes), len(structures)
    assert isinstance(batch, AtomsBatch)
    assert len(batch) == batch.num_structures == s and batch.num_atoms_total == n
    assert batch[keys.NUM_ATOMS].tolist() == sizes
    assert batch[keys.BATCH].tolist() == [k for k, size in enumerate(sizes) for _ in range(size)]
    assert batch[keys.POSITIONS].shape == (n, 3) and batch[keys.ATOMIC_NUMBERS].shape == (n,)
    assert batch[keys.CELL].shape == (s, 3, 3) and batch[keys.PBC].shape == (s, 3)
    assert batch[keys.ENERGY].shape == (s,) and batch[keys.FORCES].shape == (n, 3)
    assert batch[keys.ATOMIC_NUMBERS].tolist() == [z for a in structures for z in a.numbers.tolist()]
    assert batch[keys.PBC].tolist() == [a.pbc.tolist() for a in structures]

    edges = [g[keys.EDGE_INDEX].shape[1] for g in graphs]
    assert all(e > 0 for e in edges)
    assert batch[keys.EDGE_INDEX].shape == (2, sum(edges)) and batch[keys.CELL_SHIFTS].shape == (sum(edges), 3)
    # Paired edge lists: the batch's first half is the structures' first halves, then their second halves.
    assert batch[keys.NUM_EDGE_PAIRS].tolist() == [count // 2 for count in edges]
    half = sum(edges) // 2
    start_atom, start_edge = 0, 0
    for graph, size, count in zip(graphs, sizes, edges):
        for part, where in ((slice(0, count // 2), start_edge), (slice(count // 2, count), half + start_edge)):
            block = batch[keys.EDGE_INDEX][:, where : where + count // 2]
            assert torch.equal(block, graph[keys.EDGE_INDEX][:, part] + start_atom)
            assert block.min() >= start_atom and block.max() < start_atom + size
            assert torch.equal(batch[keys.CELL_SHIFTS][where : where + count // 2], graph[keys.CELL_SHIFTS][part])
        start_atom, start_edge = start_atom + size, start_edge + count // 2
    # Edges never connect two structures.
    i, j = batch[keys.EDGE_INDEX]
    assert torch.equal(batch[keys.BATCH][i], batch[keys.BATCH][j])

    labels = np.array([a.info["_energy"] for a in structures])
    np.testing.assert_allclose(batch[keys.ENERGY].numpy(), labels, rtol=1e-6)
    np.testing.assert_allclose(
        batch[keys.FORCES].numpy(), np.concatenate([a.arrays["_forces"] for a in structures]), atol=1e-6
    )
    assert infer_batch_size(batch) == s  # the Trainer averages per structure, not per atom


def test_edge_vectors_by_hand(structures, graphs):
    batch = collate_atoms(graphs).to("cpu", dtype=torch.float64)
    vectors = edge_vectors(batch).numpy()
    positions = np.concatenate([a.positions for a in structures])
    cells = [a.cell.array for a in structures]
    owner = np.repeat(np.arange(len(structures)), [len(a) for a in structures])
    i, j = batch[keys.EDGE_INDEX].numpy()
    shifts = batch[keys.CELL_SHIFTS].numpy()
    expected = np.array([positions[b] - positions[a] + shift @ cells[owner[a]] for a, b, shift in zip(i, j, shifts)])
    # Graph positions are stored in the default (float32) precision.
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    distances = np.linalg.norm(expected, axis=1)
    assert distances.max() < CUTOFF and distances.min() > 1.0
    assert np.abs(shifts).sum() > 0  # periodic images were part of it
    assert np.abs(shifts[owner[i] == 1]).sum() == 0  # the cluster has none


def test_edge_vectors_follow_other_positions_differentiably(graphs):
    batch = collate_atoms(graphs).to("cpu", dtype=torch.float64)
    displaced = batch[keys.POSITIONS] + 0.01 * torch.randn_like(batch[keys.POSITIONS])
    displaced.requires_grad_(True)
    vectors = edge_vectors(batch, displaced)
    i, j = batch[keys.EDGE_INDEX]
    expected = edge_vectors(batch) + (displaced - batch[keys.POSITIONS])[j] - (displaced - batch[keys.POSITIONS])[i]
    torch.testing.assert_close(vectors, expected.detach())
    vectors.pow(2).sum().backward()
    assert displaced.grad is not None and displaced.grad.abs().sum() > 0


def test_unknown_key_names_the_known_ones(graphs):
    batch = collate_atoms(graphs)
    with pytest.raises(KeyError) as info:
        batch["energies"]
    message = str(info.value)
    assert "energies" in message and "energy" in message and "positions" in message
    assert "energies" not in batch and keys.ENERGY in batch
    expected = set(keys.ATOMS_KEYS) | {keys.ENERGY, keys.FORCES, keys.NUM_EDGE_PAIRS}
    assert expected <= set(batch) <= expected | set(keys.LABEL_KEYS)


def test_a_batch_needs_every_atoms_key(graphs):
    tensors = dict(collate_atoms(graphs))
    del tensors[keys.CELL_SHIFTS]
    with pytest.raises(KeyError, match=keys.CELL_SHIFTS):
        AtomsBatch(tensors)


def test_to_dtype_converts_floating_point_entries_only(graphs):
    batch = collate_atoms(graphs)
    converted = batch.to("cpu", dtype=torch.float64)
    assert converted is not batch and len(converted) == len(batch)
    for key in batch:
        before, after = batch[key], converted[key]
        if before.is_floating_point():
            assert after.dtype == torch.float64, key
            torch.testing.assert_close(after, before.double())
        else:
            assert after.dtype == before.dtype, key
            assert torch.equal(after, before), key
    assert converted[keys.PBC].dtype == torch.bool and converted[keys.EDGE_INDEX].dtype == torch.int64
    assert batch[keys.POSITIONS].dtype == torch.float32  # the original is untouched
    # No dtype: only the device changes.
    assert all(batch.to("cpu")[k].dtype == batch[k].dtype for k in batch)


def test_replace_swaps_entries_without_touching_the_original(graphs):
    batch = collate_atoms(graphs)
    new_positions = batch[keys.POSITIONS] + 1.0
    replaced = batch.replace(**{keys.POSITIONS: new_positions})
    assert replaced[keys.POSITIONS] is new_positions
    assert not torch.equal(batch[keys.POSITIONS], new_positions)
    assert replaced[keys.EDGE_INDEX] is batch[keys.EDGE_INDEX]


def test_mixing_labelled_and_unlabelled_structures_is_refused(structures):
    labelled = atoms_to_graph(structures[0], CUTOFF)
    unlabelled = atoms_to_graph(structures[1], CUTOFF, with_labels=False)
    assert keys.ENERGY not in unlabelled
    with pytest.raises(KeyError, match="energy"):
        collate_atoms([labelled, unlabelled])
    plain = collate_atoms([atoms_to_graph(a, CUTOFF, with_labels=False) for a in structures])
    assert keys.ENERGY not in plain and keys.FORCES not in plain and len(plain) == len(structures)


def test_a_single_structure_batch(structures, graphs):
    batch = collate_atoms(graphs[1:2])
    assert len(batch) == 1 and batch[keys.BATCH].unique().tolist() == [0]
    assert torch.equal(batch[keys.EDGE_INDEX], graphs[1][keys.EDGE_INDEX])
    assert batch[keys.ENERGY].shape == (1,)
