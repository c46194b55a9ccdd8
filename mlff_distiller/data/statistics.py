"""Dataset statistics that students use to start from a sensible energy and force scale."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import keys


@dataclass
class DatasetStatistics:
    """Per-element reference energies (eV, least squares), force RMS (eV/Å), neighbours per atom."""

    atomic_energies: dict[int, float] = field(default_factory=dict)
    force_rms: float = 1.0
    energy_residual_std_per_atom: float = 1.0
    avg_num_neighbors: float = 1.0
    num_structures: int = 0

    def to_dict(self) -> dict:
        return {
            "atomic_energies": {int(k): float(v) for k, v in self.atomic_energies.items()},
            "force_rms": self.force_rms,
            "energy_residual_std_per_atom": self.energy_residual_std_per_atom,
            "avg_num_neighbors": self.avg_num_neighbors,
            "num_structures": self.num_structures,
        }


def compute_statistics(structures: Iterable[Mapping[str, np.ndarray | object]]) -> DatasetStatistics:
    """Statistics over per-structure dicts holding atomic_numbers, energy, forces and edge_index.

    Reference energies solve min ||counts @ e - E||² (counts: atoms of each element per structure);
    elements absent from the data get no entry.
    """
    rows, energies, forces, edges, atoms = [], [], [], 0, 0
    items = list(structures)
    if not items:
        raise ValueError("Cannot compute statistics of an empty dataset.")
    elements = sorted({int(z) for item in items for z in np.asarray(item[keys.ATOMIC_NUMBERS]).tolist()})
    column = {z: c for c, z in enumerate(elements)}
    for item in items:
        numbers = np.asarray(item[keys.ATOMIC_NUMBERS])
        row = np.zeros(len(elements))
        for z, n in zip(*np.unique(numbers, return_counts=True)):
            row[column[int(z)]] = n
        rows.append(row)
        energies.append(float(np.asarray(item[keys.ENERGY])))
        forces.append(np.asarray(item[keys.FORCES]).reshape(-1))
        edges += np.asarray(item[keys.EDGE_INDEX]).shape[1]
        atoms += len(numbers)
    counts, energies_arr = np.array(rows), np.array(energies)
    solution, *_ = np.linalg.lstsq(counts, energies_arr, rcond=None)
    residual_per_atom = (energies_arr - counts @ solution) / counts.sum(1)
    all_forces = np.concatenate(forces)
    return DatasetStatistics(
        atomic_energies={z: float(solution[column[z]]) for z in elements},
        force_rms=float(np.sqrt(np.mean(all_forces**2))) if all_forces.size else 1.0,
        energy_residual_std_per_atom=float(residual_per_atom.std()) if len(items) > 1 else 1.0,
        avg_num_neighbors=edges / atoms,
        num_structures=len(items),
    )
