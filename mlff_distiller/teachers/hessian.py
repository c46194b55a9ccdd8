"""Rows of a teacher's energy Hessian, the labels of Hessian distillation (Amin et al., ICLR 2025).

Row c of the Hessian of a structure with n atoms is H[c, :] = d^2E / dx_c dx (3n values, eV/Å²), with
c = 3 * atom + direction. Any ASE calculator gives rows by central finite differences of its forces,
H[c, :] = -(F(x + h e_c) - F(x - h e_c)) / 2h (2 calls per row, error O(h²)); H is symmetric, so this
column is also the row. A teacher that can do better (e.g. autograd through a torch model) defines
``hessian_rows(atoms, coords) -> ndarray (rows, 3n)`` and is used instead; :func:`autograd_hessian_rows`
computes rows of any torch energy function that way, and :mod:`.autograd` does it for CHGNet and SevenNet.

``method`` chooses (:func:`hessian_rows_function`): ``"fd"`` finite differences always; ``"autograd"``
the teacher's own method or :mod:`.autograd`, an error for a teacher that has neither; ``"auto"``
autograd where available, else finite differences.

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

HESSIAN_METHODS = ("fd", "autograd", "auto")
"""Accepted values of ``hessian_method``."""

RowsFunction = Callable[["Atoms", Sequence[int]], np.ndarray]


class HessianMethodError(ValueError):
    """An unknown ``hessian_method``, or ``autograd`` for a teacher without autograd rows."""


def check_hessian_method(method: str) -> None:
    if method not in HESSIAN_METHODS:
        raise HessianMethodError(
            f"hessian_method={method!r} is invalid; accepted: {', '.join(HESSIAN_METHODS)} (fd: central finite "
            "differences of the teacher's forces, 2 calls per row; autograd: double backward through a torch "
            "teacher; auto: autograd where the teacher allows it, else fd)."
        )


def _autograd_teachers() -> str:
    from .calculators import TEACHERS

    return ", ".join(name for name, spec in TEACHERS.items() if spec.autograd_hessian)


def hessian_rows_function(
    calculator: Any, method: str = "auto", delta: float = DEFAULT_DELTA
) -> tuple[str, RowsFunction]:
    """How ``calculator``'s Hessian rows are computed under ``method`` (one of :data:`HESSIAN_METHODS`),
    as ``(kind, rows(atoms, coords))`` with kind ``"calculator"`` (its own ``hessian_rows``), ``"autograd"``
    (:mod:`.autograd`) or ``"fd"``. Raises :class:`HessianMethodError` for an unknown method, or for
    ``"autograd"`` when the teacher has no autograd rows."""
    from .autograd import autograd_rows_function
    from .calculators import calculator_class

    check_hessian_method(method)
    if method != "fd":
        own = getattr(calculator, "hessian_rows", None)
        if callable(own):
            return "calculator", lambda atoms, coords: own(atoms, np.asarray(coords, dtype=np.int64))
        adapter = autograd_rows_function(calculator)
        if adapter is not None:
            return "autograd", adapter
        if method == "autograd":
            raise HessianMethodError(
                f"hessian_method='autograd', but the teacher {calculator_class(calculator)} has no autograd "
                f"Hessian rows (teachers with them: {_autograd_teachers()}, or any calculator with a "
                "hessian_rows(atoms, coords) method). Use hessian_method=fd or auto for this teacher."
            )
    return "fd", lambda atoms, coords: finite_difference_hessian_rows(atoms, calculator, coords, delta)


def check_hessian_method_for(teacher: Any, method: str) -> None:
    """:func:`hessian_rows_function`'s verdict for a built-in teacher (a :class:`~.calculators.TeacherSpec`,
    or None for a teacher known only once built) without building it."""
    check_hessian_method(method)
    if method == "autograd" and teacher is not None and not teacher.autograd_hessian:
        raise HessianMethodError(
            f"hessian_method='autograd', but the teacher {teacher.name!r} has no autograd Hessian rows "
            f"(teachers with them: {_autograd_teachers()}). Use hessian_method=fd or auto for this teacher."
        )


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
    atoms: Atoms, calculator: Any, coords: Sequence[int], delta: float = DEFAULT_DELTA, method: str = "auto"
) -> np.ndarray:
    """Rows ``coords`` of ``calculator``'s Hessian at ``atoms`` by ``method`` (see :func:`hessian_rows_function`;
    ``"auto"``: the calculator's own ``hessian_rows``, else autograd where known, else finite differences)."""
    return _checked(hessian_rows_function(calculator, method, delta)[1](atoms, coords), atoms, coords, calculator)


def _checked(rows: Any, atoms: Atoms, coords: Sequence[int], calculator: Any) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape != (len(coords), 3 * len(atoms)):
        raise ValueError(
            f"{type(calculator).__name__}'s Hessian rows have shape {rows.shape}, expected "
            f"({len(coords)}, {3 * len(atoms)})."
        )
    return rows


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
    atoms: Atoms,
    calculator: Any,
    rows: int,
    seed: int,
    index: int,
    delta: float = DEFAULT_DELTA,
    method: str | tuple[str, RowsFunction] = "auto",
) -> str:
    """Compute ``rows`` seeded-random Hessian rows of structure ``index`` and store them in ``atoms``, with
    how they were computed in ``atoms.info["hessian_method"]``; returns that kind. ``method`` is a
    ``hessian_method`` or what :func:`hessian_rows_function` returned (resolved once per labelling job)."""
    kind, function = hessian_rows_function(calculator, method, delta) if isinstance(method, str) else method
    coords = choose_row_coords(len(atoms), rows, seed, index)
    store_hessian_rows(atoms, coords, _checked(function(atoms, coords), atoms, coords, calculator))
    atoms.info[keys.HESSIAN_METHOD_INFO] = kind
    return kind
