"""Structures with energy and force labels from any ASE-readable file, with neighbour lists."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import keys
from .neighbors import neighbor_list, reverse_pair_order


class DataError(ValueError):
    """A data file or one of its structures cannot be used; the message names the file and index."""


def read_labelled_structures(
    path: str | os.PathLike[str], energy_key: str | None = None, forces_key: str | None = None, index: str = ":"
) -> list[Any]:
    """Read every structure of ``path`` and check that each has finite energy and forces.

    Labels come from the attached calculator results (extxyz, .traj, ASE db all keep them), or from
    ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` when those keys are given.
    Returns ASE ``Atoms`` with ``atoms.info["_energy"]`` and ``atoms.arrays["_forces"]`` set, and
    ``atoms.info["_hessian_row_coord"]`` / ``["_hessian_rows"]`` for structures that carry Hessian rows
    (see :func:`hessian_rows_of`).
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist.")
    try:
        structures = ase.io.read(path, index=index)
    except Exception as error:
        raise DataError(
            f"Data file {str(path)!r} could not be read by ASE ({type(error).__name__}: {error})."
        ) from error
    if not isinstance(structures, list):
        structures = [structures]
    if not structures:
        raise DataError(f"Data file {str(path)!r} holds no structures.")
    for number, atoms in enumerate(structures):
        where = f"structure {number} of {str(path)!r}"
        energy = _label(atoms, energy_key, "info", where, "energy")
        forces = np.asarray(_label(atoms, forces_key, "arrays", where, "forces"), dtype=np.float64)
        if forces.shape != (len(atoms), 3):
            raise DataError(f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3).")
        if not math.isfinite(float(energy)) or not np.isfinite(forces).all():
            raise DataError(f"{where}: energy or forces are not finite (NaN or inf).")
        atoms.info["_energy"] = float(energy)
        atoms.arrays["_forces"] = forces
        stress = _stress(atoms)
        if stress is not None:
            if not np.isfinite(stress).all():
                raise DataError(f"{where}: stress is not finite (NaN or inf).")
            atoms.info["_stress"] = stress
        rows = hessian_rows_of(atoms, where)
        if rows is not None:
            atoms.info["_hessian_row_coord"], atoms.info["_hessian_rows"] = rows
    # Stress trains only when every structure has it (a set mixing molecules and crystals has none).
    if not all("_stress" in atoms.info for atoms in structures):
        for atoms in structures:
            atoms.info.pop("_stress", None)
    return structures


def _stress(atoms: Any) -> np.ndarray | None:
    """The stored stress as a 3x3 matrix (eV/Å³), or None."""
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    if "stress" not in results or not atoms.pbc.all():
        return None
    stress = np.asarray(results["stress"], dtype=np.float64)
    if stress.shape == (6,):
        xx, yy, zz, yz, xz, xy = stress
        stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return stress.reshape(3, 3)


def hessian_rows_of(atoms: Any, where: str = "structure") -> tuple[np.ndarray, np.ndarray] | None:
    """The Hessian rows a labelled structure carries, as (coordinate indices (rows,), rows (rows, 3n)), or None.

    They are stored as ``atoms.info["hessian_row_index"]`` and ``atoms.arrays["hessian_rows"]`` (see
    :mod:`~mlff_distiller.data.keys`); inconsistent or non-finite rows raise :class:`DataError` naming ``where``.
    """
    if keys.HESSIAN_ROWS_ARRAY not in atoms.arrays:
        return None
    n = len(atoms)
    if keys.HESSIAN_ROW_INDEX_INFO not in atoms.info:
        raise DataError(
            f"{where} has arrays[{keys.HESSIAN_ROWS_ARRAY!r}] but no info[{keys.HESSIAN_ROW_INDEX_INFO!r}]."
        )
    coords = np.atleast_1d(np.asarray(atoms.info[keys.HESSIAN_ROW_INDEX_INFO])).astype(np.int64)
    stored = np.asarray(atoms.arrays[keys.HESSIAN_ROWS_ARRAY], dtype=np.float64).reshape(n, -1)
    if coords.ndim != 1 or stored.shape[1] != 3 * len(coords):
        raise DataError(
            f"{where}: {len(coords)} Hessian row indices but arrays[{keys.HESSIAN_ROWS_ARRAY!r}] has "
            f"{stored.shape[1]} columns (expected 3 per row)."
        )
    if ((coords < 0) | (coords >= 3 * n)).any():
        raise DataError(f"{where}: Hessian row indices {coords.tolist()} are not all in [0, {3 * n}).")
    if not np.isfinite(stored).all():
        raise DataError(f"{where}: Hessian rows are not finite (NaN or inf).")
    rows = stored.reshape(n, len(coords), 3).transpose(1, 0, 2).reshape(len(coords), 3 * n)
    return coords, rows


def _label(atoms: Any, key: str | None, where_kind: str, where: str, name: str) -> Any:
    if key is not None:
        store = atoms.info if where_kind == "info" else atoms.arrays
        if key not in store:
            raise DataError(
                f"{where} has no {where_kind}[{key!r}] ({name}); it has {sorted(store)}. "
                f"Set the data's {name}_key to one of those, or null to use calculator results."
            )
        return store[key]
    calc = atoms.calc
    if calc is None or name not in getattr(calc, "results", {}):
        raise DataError(
            f"{where} has no {name} from a calculator. Set the data's {name}_key to the "
            f"atoms.{where_kind} key that holds it (available: {sorted(getattr(atoms, where_kind))})."
        )
    return calc.results[name]


def atoms_to_graph(
    atoms: Any, cutoff: float, with_labels: bool = True, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One structure as the tensors that :func:`~mlff_distiller.data.batch.collate_atoms` expects
    (floating-point entries in ``dtype``, default: torch's default dtype).

    The edges are ordered in reverse pairs (``keys.NUM_EDGE_PAIRS``, see :func:`reverse_pair_order`):
    pairing them here, once per structure, spares the students a sort in every forward.
    """
    dtype = dtype or torch.get_default_dtype()
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    edge_index, shifts = neighbor_list(atoms.positions, cell, pbc, cutoff)
    order = reverse_pair_order(edge_index, shifts)
    if order is not None:
        edge_index, shifts = edge_index[:, order], shifts[order]
    graph = {
        keys.POSITIONS: torch.tensor(atoms.positions, dtype=dtype),
        keys.ATOMIC_NUMBERS: torch.tensor(atoms.numbers, dtype=torch.long),
        keys.CELL: torch.tensor(cell, dtype=dtype),
        keys.PBC: torch.tensor(pbc),
        keys.EDGE_INDEX: torch.from_numpy(edge_index),
        keys.CELL_SHIFTS: torch.from_numpy(shifts).to(dtype),
    }
    if order is not None:
        graph[keys.NUM_EDGE_PAIRS] = torch.tensor(edge_index.shape[1] // 2)
    if with_labels:
        graph[keys.ENERGY] = torch.tensor(atoms.info["_energy"], dtype=dtype)
        graph[keys.FORCES] = torch.tensor(atoms.arrays["_forces"], dtype=dtype)
        if "_stress" in atoms.info:
            graph[keys.STRESS] = torch.tensor(atoms.info["_stress"], dtype=dtype)
        if "_hessian_rows" in atoms.info:
            graph[keys.HESSIAN_ROW_COORD] = torch.tensor(atoms.info["_hessian_row_coord"], dtype=torch.long)
            graph[keys.HESSIAN_ROWS] = torch.tensor(atoms.info["_hessian_rows"], dtype=dtype)
    return graph


class AtomsDataset(Dataset):
    """Labelled structures as graphs; neighbour lists are built once, here, since structures never move."""

    def __init__(self, structures: Sequence[Any], cutoff: float) -> None:
        self.cutoff = cutoff
        self.graphs = [atoms_to_graph(atoms, cutoff) for atoms in structures]
        self.config_types = [str(atoms.info.get("config_type", "")) for atoms in structures]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.graphs[index]

    def subset(self, indices: Sequence[int]) -> AtomsDataset:
        new = AtomsDataset.__new__(AtomsDataset)
        new.cutoff = self.cutoff
        new.graphs = [self.graphs[i] for i in indices]
        new.config_types = [self.config_types[i] for i in indices]
        return new
