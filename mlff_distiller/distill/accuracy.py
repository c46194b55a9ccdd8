"""A student against stored teacher labels: energy, force and Hessian-row errors, and parity data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import keys
from ..data.batch import collate_atoms
from ..data.dataset import atoms_to_graph, hessian_rows_of
from ..losses.hessian import row_slots, student_hessian_entries
from .committee import frozen_copy


def labelled_copy(atoms: Any) -> Any:
    """A copy with the ``_energy`` / ``_forces`` (/ Hessian rows) entries :func:`atoms_to_graph` reads, taken
    from the stored calculator results when the structure was not read by ``read_labelled_structures``."""
    out = atoms.copy()
    if "_energy" not in atoms.info:
        out.info["_energy"] = float(atoms.get_potential_energy())
        out.arrays["_forces"] = np.asarray(atoms.get_forces(), dtype=np.float64)
    out.info.pop("_stress", None)
    rows = hessian_rows_of(atoms)
    if rows is not None:
        out.info["_hessian_row_coord"], out.info["_hessian_rows"] = rows
    return out


def evaluate_against_labels(
    student: nn.Module, structures: Sequence[Any], batch_size: int = 16
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Student vs the stored (teacher) labels of ``structures``: (metrics, parity data).

    Metrics, exact over all structures (sums divided once): ``energy_mae_per_atom`` (meV/atom), ``force_mae``,
    ``force_rmse`` and ``force_std`` (the spread of the teacher's force components) in meV/Å, ``force_mae_rel``
    (force MAE / force std), and ``hessian_mae`` (meV/Å², over all stored row entries) when rows exist.
    Parity data: per-atom energies and force components, teacher and student, eV and eV/Å.
    """
    if not structures:
        raise ValueError("evaluate_against_labels needs at least one labelled structure.")
    model = frozen_copy(student)
    dtype = next(model.parameters()).dtype
    graphs = [atoms_to_graph(labelled_copy(atoms), model.cutoff, dtype=dtype) for atoms in structures]
    energy, energy_ref, forces, forces_ref, hessian_errors = [], [], [], [], []
    for start in range(0, len(graphs), batch_size):
        batch = collate_atoms(graphs[start : start + batch_size])
        positions = batch[keys.POSITIONS].detach().requires_grad_(keys.HESSIAN_ROWS in batch)
        out = model(batch.replace(**{keys.POSITIONS: positions}))
        atoms = batch[keys.NUM_ATOMS].to(dtype)
        energy.append((out[keys.ENERGY].detach() / atoms).double())
        energy_ref.append((batch[keys.ENERGY] / atoms).double())
        forces.append(out[keys.FORCES].detach().double().reshape(-1))
        forces_ref.append(batch[keys.FORCES].double().reshape(-1))
        if keys.HESSIAN_ROWS in batch:
            structure = batch[keys.BATCH][batch[keys.HESSIAN_ROW_COORD] // 3]
            slots = row_slots(structure, structure.shape[0], None)
            entries = student_hessian_entries(
                out[keys.FORCES], positions, batch, slots, int(slots.max()) + 1, create_graph=False
            )
            hessian_errors.append((entries.detach() - batch[keys.HESSIAN_ROWS]).double())
    parity = {
        "energy_per_atom_teacher": torch.cat(energy_ref).numpy(),
        "energy_per_atom_student": torch.cat(energy).numpy(),
        "forces_teacher": torch.cat(forces_ref).numpy(),
        "forces_student": torch.cat(forces).numpy(),
    }
    force_error = parity["forces_student"] - parity["forces_teacher"]
    force_std = float(parity["forces_teacher"].std())
    metrics = {
        "energy_mae_per_atom": 1e3
        * float(np.abs(parity["energy_per_atom_student"] - parity["energy_per_atom_teacher"]).mean()),
        "force_mae": 1e3 * float(np.abs(force_error).mean()),
        "force_rmse": 1e3 * float(np.sqrt((force_error**2).mean())),
        "force_std": 1e3 * force_std,
        "force_mae_rel": float(np.abs(force_error).mean()) / force_std if force_std > 0 else float("nan"),
    }
    if hessian_errors:
        metrics["hessian_mae"] = 1e3 * float(torch.cat(hessian_errors).abs().mean())
    return metrics, parity
