"""`neighbor_list` against ASE's reference implementation, with vesin and with the ASE fallback."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ase.build import fcc111
from ase.neighborlist import primitive_neighbor_list

from mlff_distiller.data.neighbors import neighbor_list, reverse_pair_order


@pytest.fixture(params=["vesin", "ase_fallback"])
def backend(request, monkeypatch):
    if request.param == "ase_fallback":
        monkeypatch.setitem(sys.modules, "vesin", None)  # `from vesin import ...` now raises ImportError
    else:
        pytest.importorskip("vesin")
    return request.param


def _rng(seed):
    return np.random.default_rng(seed)


def tiny_cubic():
    """Two atoms in a 2 Å cube; with a 4.5 Å cutoff each pair appears through many images, and each
    atom sees its own images."""
    cell = 2.0 * np.eye(3)
    return _rng(0).uniform(0, 2, (2, 3)), cell, np.array([True, True, True]), 4.5


def single_atom():
    cell = np.diag([2.1, 2.3, 2.6])
    return np.array([[0.3, 0.2, 0.1]]), cell, np.array([True, True, True]), 4.0


def triclinic():
    cell = np.array([[3.0, 0.0, 0.0], [1.2, 2.8, 0.0], [0.7, 0.9, 3.1]])
    fractional = _rng(1).uniform(-0.3, 1.3, (6, 3))  # some atoms outside the cell, as in MD
    return fractional @ cell, cell, np.array([True, True, True]), 5.0


def slab():
    atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    atoms.rattle(0.05, seed=2)
    assert atoms.pbc.tolist() == [True, True, False]
    return atoms.positions, atoms.cell.array, atoms.pbc, 5.0


def slab_mixed_axis():
    cell = np.array([[3.0, 0.0, 0.0], [1.2, 2.8, 0.0], [0.0, 0.0, 9.0]])
    return _rng(3).uniform(0, 1, (5, 3)) @ cell, cell, np.array([True, False, True]), 6.0


def free_cluster():
    positions = _rng(4).uniform(-3.0, 3.0, (12, 3))
    return positions, np.zeros((3, 3)), np.array([False, False, False]), 3.5


def cluster_with_cell():
    """Non-periodic, but with a (meaningless) cell set: no images must appear."""
    positions, _, pbc, cutoff = free_cluster()
    return positions, 4.0 * np.eye(3), pbc, cutoff


CASES = {
    "tiny_cubic_multiple_images": tiny_cubic,
    "single_atom_self_images": single_atom,
    "triclinic": triclinic,
    "slab_pbc_TTF": slab,
    "pbc_TFT": slab_mixed_axis,
    "free_cluster": free_cluster,
    "cluster_with_cell": cluster_with_cell,
}


def _triples(i, j, shifts):
    return sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.asarray(shifts).tolist())))


@pytest.mark.parametrize("case", CASES)
def test_matches_ase_primitive_neighbor_list(backend, case):
    positions, cell, pbc, cutoff = CASES[case]()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    assert edge_index.dtype == np.int64 and shifts.dtype == np.int64
    assert edge_index.shape == (2, shifts.shape[0]) and shifts.shape[1:] == (3,)

    i, j, s = primitive_neighbor_list("ijS", pbc, cell, positions, cutoff, self_interaction=False)
    got, expected = _triples(edge_index[0], edge_index[1], shifts), _triples(i, j, s)
    assert len(set(got)) == len(got)  # no duplicate edge
    assert got == expected

    vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts @ cell
    distances = np.linalg.norm(vectors, axis=1)
    assert np.all(distances < cutoff) and np.all(distances > 0.1)
    # Both directions, with opposite shifts.
    assert set(got) == {(b, a, tuple(-np.asarray(t))) for a, b, t in got}
    # Self-pairs only as periodic images; no image along a non-periodic axis.
    same = edge_index[0] == edge_index[1]
    assert np.all(np.abs(shifts[same]).sum(1) > 0)
    assert np.all(shifts[:, ~np.asarray(pbc)] == 0)
    assert np.all(np.diff(edge_index[0]) >= 0)  # sorted by the first atom


def test_the_interesting_cases_are_interesting(backend):
    """Guards the fixtures: multiple images, self-images and empty non-periodic shifts really occur."""
    positions, cell, pbc, cutoff = tiny_cubic()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    assert np.abs(shifts).max() >= 2  # images beyond the nearest one
    assert (edge_index[0] == edge_index[1]).any()
    pairs = list(zip(edge_index[0].tolist(), edge_index[1].tolist()))
    assert pairs.count((0, 1)) > 10  # one pair, many images
    positions, cell, pbc, cutoff = single_atom()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    assert edge_index.shape[1] > 10 and np.all(edge_index == 0)
    positions, cell, pbc, cutoff = free_cluster()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    assert edge_index.shape[1] > 0 and not shifts.any()


def test_no_neighbours_within_a_short_cutoff(backend):
    positions = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    edge_index, shifts = neighbor_list(positions, np.zeros((3, 3)), np.zeros(3, bool), 2.0)
    assert edge_index.shape == (2, 0) and shifts.shape == (0, 3)


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (np.zeros((3, 3)), [True, True, True]),
        (np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]]), [True, True, True]),  # coplanar vectors
        (np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 0]]), [True, True, False]),
    ],
)
def test_singular_cell_with_pbc_is_refused(backend, cell, pbc):
    positions = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="non-singular cell"):
        neighbor_list(positions, cell, pbc, 2.0)


def test_edge_order_does_not_depend_on_the_backend(monkeypatch):
    pytest.importorskip("vesin")
    positions, cell, pbc, cutoff = tiny_cubic()
    with_vesin = neighbor_list(positions, cell, pbc, cutoff)
    monkeypatch.setitem(sys.modules, "vesin", None)
    with_ase = neighbor_list(positions, cell, pbc, cutoff)
    np.testing.assert_array_equal(with_vesin[0], with_ase[0])
    np.testing.assert_array_equal(with_vesin[1], with_ase[1])


@pytest.mark.parametrize("case", CASES)
def test_reverse_pair_order_puts_each_reverse_half_a_list_later(case):
    positions, cell, pbc, cutoff = CASES[case]()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    order = reverse_pair_order(edge_index, shifts)
    num_edges = edge_index.shape[1]
    assert order is not None and sorted(order.tolist()) == list(range(num_edges))
    (i, j), paired_shifts, half = edge_index[:, order], shifts[order], num_edges // 2
    assert np.array_equal(i[half:], j[:half]) and np.array_equal(j[half:], i[:half])
    assert np.array_equal(paired_shifts[half:], -paired_shifts[:half])
    # The first half: i < j, or a periodic self-image whose first non-zero shift component is positive.
    for a, b, shift in zip(i[:half], j[:half], paired_shifts[:half]):
        assert a < b or (a == b and shift[np.flatnonzero(shift)[0]] > 0)
    vectors = positions[j] - positions[i] + paired_shifts @ cell
    np.testing.assert_array_equal(vectors[half:], -vectors[:half])  # same distances, exactly
    # The first half keeps the neighbour list's (lexicographic) order.
    assert np.all(np.diff(order[:half]) > 0)


def test_reverse_pair_order_refuses_lists_that_cannot_be_paired():
    positions, cell, pbc, cutoff = tiny_cubic()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    i, j = edge_index
    half_list = (i < j) | ((i == j) & (shifts[:, 0] > 0))
    assert reverse_pair_order(edge_index[:, half_list], shifts[half_list]) is None
    assert reverse_pair_order(edge_index[:, 1:], shifts[1:]) is None  # odd: one edge lost its reverse
    moved = shifts.copy()
    moved[0] = [5, 5, 5]  # an image whose reverse is not in the list
    assert reverse_pair_order(edge_index, moved) is None
    own_reverse = np.array([[0, 1, 0], [0, 0, 1]])  # (0, 0) with zero shift is its own reverse
    assert reverse_pair_order(own_reverse, np.zeros((3, 3), dtype=np.int64)) is None
    empty = reverse_pair_order(np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64))
    assert empty is not None and empty.shape == (0,)


def test_reverse_pair_order_is_the_same_when_integer_keys_would_overflow():
    positions, cell, pbc, cutoff = tiny_cubic()
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    far = edge_index + 3_000_000_000  # (atoms² x shift codes) no longer fits an int64 key: sorted by columns
    assert np.array_equal(reverse_pair_order(far, shifts), reverse_pair_order(edge_index, shifts))
    duplicated = np.concatenate([edge_index, edge_index], 1), np.concatenate([shifts, shifts])
    assert reverse_pair_order(*duplicated) is None
