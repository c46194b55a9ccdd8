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
