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
    path: str | os.PathLike[str],
    energy_key: str | None = None,
    forces_key: str | None = None,
    index: str = ":",
    stress_key: str | None = None,
) -> list[Any]:
    """Read every structure of ``path`` and check that each has finite positions, energy and forces.

    Labels come from the attached calculator results (extxyz, .traj, ASE db all keep them), or from
    ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` / ``atoms.info[stress_key]`` when those keys
    are given (see :func:`attach_labels`). Stress is kept only when every structure has one (a set mixing
    molecules and crystals trains without it).
    """
    import ase.io

    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"Data file {str(path)!r} is a directory; give one ASE-readable file (extxyz, .traj, ASE db) "
            "of labelled structures."
        )
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
        attach_labels(atoms, f"structure {number} of {str(path)!r}", energy_key, forces_key, stress_key)
    keep_stress_if_all_have_it(structures)
    with_site_energies = sum("_site_energies" in atoms.arrays for atoms in structures)
    if 0 < with_site_energies < len(structures):
        missing = next(i for i, atoms in enumerate(structures) if "_site_energies" not in atoms.arrays)
        raise DataError(
            f"{with_site_energies} of the {len(structures)} structures of {str(path)!r} carry site energies "
            f"(arrays[{keys.SITE_ENERGIES_ARRAY!r}]) but structure {missing} does not; label all of them with "
            "site energies or none."
        )
    return structures


def attach_labels(
    atoms: Any,
    where: str,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
) -> Any:
    """Check ``atoms`` and store its labels where :func:`atoms_to_graph` reads them; returns ``atoms``.

    Sets ``atoms.info["_energy"]`` (eV), ``atoms.arrays["_forces"]`` (eV/Å), ``atoms.info["_stress"]``
    (3x3, eV/Å³, periodic structures with a stress), ``atoms.info["_hessian_row_coord"]`` /
    ``["_hessian_rows"]`` (see :func:`hessian_rows_of`) and ``atoms.arrays["_site_energies"]`` (the teacher's
    site energies, see :func:`site_energies_of`). A missing, mis-shaped or non-finite label, or
    non-finite positions, raise :class:`DataError` naming ``where`` and the key.
    """
    check_geometry(atoms, where)
    energy = _label(atoms, energy_key, "info", where, "energy")
    forces = np.asarray(_label(atoms, forces_key, "arrays", where, "forces"), dtype=np.float64)
    if forces.shape != (len(atoms), 3):
        raise DataError(f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3).")
    if not math.isfinite(float(energy)) or not np.isfinite(forces).all():
        raise DataError(f"{where}: energy or forces are not finite (NaN or inf).")
    atoms.info["_energy"] = float(energy)
    atoms.arrays["_forces"] = forces
    stress = _stress(atoms, stress_key, where)
    if stress is not None:
        if not np.isfinite(stress).all():
            raise DataError(f"{where}: stress is not finite (NaN or inf).")
        atoms.info["_stress"] = stress
    rows = hessian_rows_of(atoms, where)
    if rows is not None:
        atoms.info["_hessian_row_coord"], atoms.info["_hessian_rows"] = rows
    site_energies = site_energies_of(atoms, float(energy), where)
    if site_energies is not None:
        atoms.arrays["_site_energies"] = site_energies
    return atoms


def keep_stress_if_all_have_it(structures: Sequence[Any]) -> None:
    """Drop the ``_stress`` labels unless every structure has one (batches hold stress for all or none)."""
    if not all("_stress" in atoms.info for atoms in structures):
        for atoms in structures:
            atoms.info.pop("_stress", None)


def site_energies_of(atoms: Any, energy: float, where: str = "structure") -> np.ndarray | None:
    """The teacher's site energies a labelled structure carries ((n,), eV), or None.

    They are stored as ``atoms.arrays["site_energies"]`` (see :mod:`~mlff_distiller.data.keys`); a wrong
    shape, non-finite values or a sum that differs from ``energy`` by more than
    ``keys.SITE_ENERGY_SUM_TOLERANCE`` per atom raise :class:`DataError` naming ``where``.
    """
    if keys.SITE_ENERGIES_ARRAY not in atoms.arrays:
        return None
    values = np.asarray(atoms.arrays[keys.SITE_ENERGIES_ARRAY], dtype=np.float64)
    if values.shape != (len(atoms),):
        raise DataError(
            f"{where}: arrays[{keys.SITE_ENERGIES_ARRAY!r}] has shape {values.shape}, expected ({len(atoms)},) "
            "(one energy per atom, eV)."
        )
    if not np.isfinite(values).all():
        raise DataError(f"{where}: site energies are not finite (NaN or inf).")
    mismatch = abs(float(values.sum()) - energy)
    if mismatch > keys.SITE_ENERGY_SUM_TOLERANCE * max(len(atoms), 1):
        raise DataError(
            f"{where}: the site energies sum to {values.sum():.6f} eV but the energy is {energy:.6f} eV "
            f"({1e3 * mismatch / max(len(atoms), 1):.3g} meV/atom apart; at most "
            f"{1e3 * keys.SITE_ENERGY_SUM_TOLERANCE:g} meV/atom is accepted). A student's site energies always sum "
            "to its energy, so these labels cannot both be matched."
        )
    return values


def check_geometry(atoms: Any, where: str = "the structure") -> None:
    """Raise :class:`DataError` naming ``where`` when positions or the cell are not finite, or a periodic
    structure has a singular cell (neighbour lists would fail on it, or give a silent wrong answer)."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise DataError(
            f"{where}: positions of atom(s) {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are not finite "
            f"(e.g. {positions[bad[0]].tolist()}); every coordinate must be a finite number (Å)."
        )
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.isfinite(cell).all():
        raise DataError(f"{where}: the cell {cell.tolist()} is not finite.")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12:
        raise DataError(
            f"{where}: periodic (pbc={pbc.tolist()}) but its cell {cell.tolist()} has zero volume; give three "
            "independent lattice vectors, or pbc=False for a molecule or cluster."
        )


def _stress(atoms: Any, key: str | None = None, where: str = "the structure") -> np.ndarray | None:
    """The stored stress of a periodic structure as a 3x3 matrix (eV/Å³): ``atoms.info[key]``, or the
    calculator's; None when there is none or the structure is not periodic (stress needs a volume)."""
    if not atoms.pbc.all():
        return None
    if key is not None:
        if key not in atoms.info:
            raise DataError(
                f"{where} has no info[{key!r}] (stress); it has {sorted(atoms.info)}. Set the data's stress_key "
                "to one of those, or null to use calculator results."
            )
        value = np.asarray(atoms.info[key], dtype=np.float64)
        if value.shape not in ((6,), (9,), (3, 3)):
            raise DataError(
                f"{where}: info[{key!r}] (stress) has shape {value.shape}; expected 6 (Voigt: xx yy zz yz xz xy), "
                "9 or 3x3 values in eV/Å³."
            )
    else:
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        if "stress" not in results:
            return None
        value = np.asarray(results["stress"], dtype=np.float64)
    if value.shape == (6,):
        xx, yy, zz, yz, xz, xy = value
        value = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return value.reshape(3, 3)


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
        if "_site_energies" in atoms.arrays:
            graph[keys.SITE_ENERGIES] = torch.tensor(atoms.arrays["_site_energies"], dtype=dtype)
    return graph


class AtomsDataset(Dataset):
    """Labelled structures as graphs; neighbour lists are built once, here, since structures never move.

    Args:
        structures: ASE ``Atoms`` with the ``_energy`` / ``_forces`` entries of :func:`read_labelled_structures`.
        cutoff: neighbour-list cutoff, Å (finite, > 0).
        source: what the structures are called in error messages (e.g. the file they came from).
        metric_groups: per structure, the index of its metric group (-1: none), stored as ``metric_group``.
        dtype: of the floating-point tensors (default: torch's default dtype).
    """

    def __init__(
        self,
        structures: Sequence[Any],
        cutoff: float,
        source: str = "the data",
        metric_groups: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_cutoff(cutoff)
        self.cutoff = cutoff
        self.graphs = []
        for number, atoms in enumerate(structures):
            where = f"structure {number} of {source}"
            check_geometry(atoms, where)
            try:
                graph = atoms_to_graph(atoms, cutoff, dtype=dtype)
            except Exception as error:  # the neighbour-list library's own message lacks the structure
                raise DataError(
                    f"{where}: its neighbour list within cutoff={cutoff} Å could not be built "
                    f"({type(error).__name__}: {error})."
                ) from error
            if metric_groups is not None:
                graph[keys.METRIC_GROUP] = torch.tensor(int(metric_groups[number]))
            self.graphs.append(graph)
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


def metric_groups_of(structures: Sequence[Any], key: str | None) -> tuple[list[str], list[int]]:
    """Group names ``"<key>=<value>"`` (sorted) of ``atoms.info[key]`` over ``structures``, and each structure's
    index into them (-1 for a structure without the key). No key, or no structure with it: no groups."""
    if key is None:
        return [], [-1] * len(structures)
    values = sorted({str(atoms.info[key]) for atoms in structures if key in atoms.info})
    position = {value: index for index, value in enumerate(values)}
    return [f"{key}={value}" for value in values], [
        position[str(atoms.info[key])] if key in atoms.info else -1 for atoms in structures
    ]


def check_cutoff(cutoff: Any) -> None:
    """Raise :class:`DataError` naming the ``cutoff`` config key unless ``cutoff`` is a finite number > 0."""
    try:
        valid = math.isfinite(float(cutoff)) and float(cutoff) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DataError(
            f"cutoff={cutoff!r} is invalid: the neighbour-list cutoff must be a finite number of Å > 0 (e.g. "
            "cutoff=5.0; the top-level `cutoff` key sets both data.cutoff and model.cutoff)."
        )
