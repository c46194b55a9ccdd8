"""Rows of a teacher's energy Hessian, the labels of Hessian distillation (Amin et al., ICLR 2025).

Row c of the Hessian of a structure with n atoms is H[c, :] = d^2E / dx_c dx (3n values, eV/Å²), with
c = 3 * atom + direction. Any ASE calculator gives rows by central finite differences of its forces,
H[c, :] = -(F(x + h e_c) - F(x - h e_c)) / 2h (2 calls per row, error O(h²)); H is symmetric, so this
column is also the row. A teacher that can do better (e.g. autograd through a torch model) defines
``hessian_rows(atoms, coords) -> ndarray (rows, 3n)`` and is used instead; :func:`autograd_hessian_rows`
computes rows of any torch energy function that way.

Which rows a structure gets is drawn at random (without repetition) from a generator seeded by
``(seed, structure index)``, so a resumed labelling job draws the same rows. Rows are stored in the
structure itself, ``atoms.info["hessian_row_index"]`` and ``atoms.arrays["hessian_rows"]``, which
extended-XYZ files round-trip (see :mod:`mlff_distiller.data.keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import keys

if TYPE_CHECKING:
    import torch
    from ase import Atoms

DEFAULT_DELTA = 0.01
"""Å; the displacement of the central differences (ASE's vibrations module uses the same)."""


def choose_row_coords(num_atoms: int, rows: int, seed: int, index: int) -> np.ndarray:
    """``min(rows, 3 * num_atoms)`` distinct coordinate indices in [0, 3 * num_atoms), sorted; seeded by
    ``(seed, index)`` so that structure ``index`` always gets the same ones."""
    if rows < 0:
        raise ValueError(f"rows={rows} must be >= 0.")
    rng = np.random.default_rng([int(seed), int(index)])
    count = min(int(rows), 3 * num_atoms)
    return np.sort(rng.choice(3 * num_atoms, size=count, replace=False)).astype(np.int64)


def finite_difference_hessian_rows(
    atoms: Atoms, calculator: Any, coords: Sequence[int], delta: float = DEFAULT_DELTA
) -> np.ndarray:
    """Rows ``coords`` of the Hessian of ``calculator``'s energy at ``atoms`` (rows, 3n), eV/Å².

    Central differences of the forces with displacement ``delta`` (Å): 2 calculator calls per row.
    ``atoms`` is not modified.
    """
    if delta <= 0:
        raise ValueError(f"delta={delta} must be > 0 (Å).")
    work = atoms.copy()
    work.calc = calculator
    reference = work.positions.copy()
    rows = np.empty((len(coords), 3 * len(atoms)))
    for k, coord in enumerate(coords):
        atom, direction = divmod(int(coord), 3)
        displaced = []
        for sign in (1.0, -1.0):
            positions = reference.copy()
            positions[atom, direction] += sign * delta
            work.positions = positions
            displaced.append(np.array(work.get_forces(), dtype=np.float64).reshape(-1))
        rows[k] = -(displaced[0] - displaced[1]) / (2.0 * delta)
    return rows


def autograd_hessian_rows(
    energy_fn: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor, coords: Sequence[int]
) -> torch.Tensor:
    """Rows ``coords`` of the Hessian of ``energy_fn`` (positions (n, 3) -> scalar energy) by double backward.

    One energy and gradient evaluation, then one backward pass per row; returns (rows, 3n) detached,
    in the dtype of ``positions``.
    """
    import torch

    with torch.enable_grad():
        x = positions.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(energy_fn(x), x, create_graph=True)
        gradient = gradient.reshape(-1)
        rows = [torch.autograd.grad(gradient[int(c)], x, retain_graph=True)[0].reshape(-1) for c in coords]
    return torch.stack(rows).detach() if rows else positions.new_zeros((0, positions.numel()))


def teacher_hessian_rows(
    atoms: Atoms, calculator: Any, coords: Sequence[int], delta: float = DEFAULT_DELTA
) -> np.ndarray:
    """Rows ``coords`` from ``calculator.hessian_rows(atoms, coords)`` when it has that method, else by
    :func:`finite_difference_hessian_rows`."""
    own = getattr(calculator, "hessian_rows", None)
    if callable(own):
        rows = np.asarray(own(atoms, np.asarray(coords, dtype=np.int64)), dtype=np.float64)
        if rows.shape != (len(coords), 3 * len(atoms)):
            raise ValueError(
                f"{type(calculator).__name__}.hessian_rows returned shape {rows.shape}, expected "
                f"({len(coords)}, {3 * len(atoms)})."
            )
        return rows
    return finite_difference_hessian_rows(atoms, calculator, coords, delta)


def store_hessian_rows(atoms: Atoms, coords: np.ndarray, rows: np.ndarray) -> None:
    """Put rows into ``atoms.info`` / ``atoms.arrays`` in the layout :mod:`mlff_distiller.data.keys` names."""
    n = len(atoms)
    coords = np.asarray(coords, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape != (len(coords), 3 * n):
        raise ValueError(f"rows have shape {rows.shape}, expected ({len(coords)}, {3 * n}).")
    atoms.info[keys.HESSIAN_ROW_INDEX_INFO] = coords
    atoms.arrays[keys.HESSIAN_ROWS_ARRAY] = rows.reshape(len(coords), n, 3).transpose(1, 0, 2).reshape(n, -1)


def stored_hessian_rows(atoms: Atoms) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows stored in ``atoms`` as (coordinate indices (rows,), rows (rows, 3n)), or None."""
    from ..data.dataset import hessian_rows_of

    return hessian_rows_of(atoms)


def label_hessian_rows(
    atoms: Atoms, calculator: Any, rows: int, seed: int, index: int, delta: float = DEFAULT_DELTA
) -> None:
    """Compute ``rows`` seeded-random Hessian rows of structure ``index`` and store them in ``atoms``."""
    coords = choose_row_coords(len(atoms), rows, seed, index)
    store_hessian_rows(atoms, coords, teacher_hessian_rows(atoms, calculator, coords, delta))
