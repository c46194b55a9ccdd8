"""Neighbour lists within a cutoff, periodic or not, from `vesin` (ASE's as a fallback)."""

from __future__ import annotations

import numpy as np


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (both i->j and j->i) with |r_ij| < cutoff and their integer cell shifts.

    Returns ``edge_index`` (2, E) int64 and ``cell_shifts`` (E, 3) int64 such that
    r_ij = positions[j] - positions[i] + cell_shifts @ cell. Self-pairs appear only as periodic
    images (non-zero shift).
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError(f"A periodic structure (pbc={pbc.tolist()}) needs a non-singular cell; got {cell.tolist()}.")
    try:
        from vesin import NeighborList
    except ImportError:  # ASE's implementation: slower, same result
        from ase.neighborlist import primitive_neighbor_list

        i, j, shifts = primitive_neighbor_list("ijS", pbc, cell, positions, cutoff, self_interaction=False)
    else:
        box = cell if pbc.any() else np.zeros((3, 3))
        periodic = pbc.tolist() if pbc.any() else False
        i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(positions, box, periodic, "ijS")
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 3)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))  # same edge order whatever the backend
    edge_index = np.stack([i[order], j[order]]).astype(np.int64)
    return edge_index, shifts[order]


def reverse_pair_order(edge_index: np.ndarray, cell_shifts: np.ndarray) -> np.ndarray | None:
    """A permutation of a full neighbour list that puts each edge's reverse E/2 places after it, or None.

    Edge k of the permuted list (k < E/2) has i < j, or i == j with a lexicographically positive
    shift (a periodic self-image); edge k + E/2 is its reverse (j, i, -S), so both have the same
    distance. The first half keeps the input's relative order. None when some edge has no reverse
    (a half list, a hand-made list), is its own reverse (i == j, S == 0) or appears twice.
    """
    i, j = np.asarray(edge_index, dtype=np.int64)
    shifts = np.asarray(cell_shifts, dtype=np.int64).reshape(-1, 3)
    num_edges = i.shape[0]
    if num_edges % 2:
        return None
    reverse = _reverse_edges(i, j, shifts)
    if not ((i[reverse] == j).all() and (j[reverse] == i).all() and (shifts[reverse] == -shifts).all()):
        return None
    if num_edges and np.bincount(reverse, minlength=num_edges).max() > 1:  # a duplicated edge
        return None
    s0, s1, s2 = shifts.T
    positive_shift = np.where(s0 != 0, s0 > 0, np.where(s1 != 0, s1 > 0, s2 > 0))
    forward = np.flatnonzero((i < j) | ((i == j) & positive_shift))
    if 2 * forward.shape[0] != num_edges:  # an edge that is its own reverse
        return None
    return np.concatenate([forward, reverse[forward]])


def _reverse_edges(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """For each edge (i, j, S), the index of an edge (j, i, -S) if the list has one (unchecked otherwise)."""
    num_edges = i.shape[0]
    if not num_edges:
        return np.zeros(0, dtype=np.int64)
    reach = int(np.abs(shifts).max())
    span = 2 * reach + 1
    atoms = int(max(i.max(), j.max())) + 1
    if atoms * atoms * span**3 >= 2**62:  # an integer key could overflow: sort the columns instead
        by_edge = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
        by_reverse = np.lexsort((-shifts[:, 2], -shifts[:, 1], -shifts[:, 0], i, j))
        reverse = np.empty(num_edges, dtype=np.int64)
        reverse[by_reverse] = by_edge  # the k-th smallest (j, i, -S) reverses the k-th smallest (i, j, S)
        return reverse
    code = ((shifts[:, 0] + reach) * span + shifts[:, 1] + reach) * span + shifts[:, 2] + reach
    reverse_code = span**3 - 1 - code  # the code of -S
    keys = (i * atoms + j) * span**3 + code
    order = np.argsort(keys, kind="stable")
    position = np.searchsorted(keys[order], (j * atoms + i) * span**3 + reverse_code)
    return order[np.minimum(position, num_edges - 1)]
