"""Committee disagreement: how uncertain a set of students is about a structure, without asking the teacher.

The score of a structure is DP-GEN's model deviation: the largest, over atoms, of the standard deviation
of the committee's force vectors, max_i sqrt(mean_k |F_ik - <F_i>|^2), in eV/Å. Students that agree
on every atom have learned the region; a large deviation on one atom is enough to make the structure
worth a teacher call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import keys
from ..data.batch import collate_atoms
from ..data.dataset import atoms_to_graph


def frozen_copy(model: nn.Module) -> nn.Module:
    """An evaluation copy of a student: eval mode, no parameter gradients, no stress."""
    out = copy.deepcopy(model).eval()
    for parameter in out.parameters():
        parameter.requires_grad_(False)
    if hasattr(out, "compute_stress"):
        out.compute_stress = False
    return out


def predict_forces(model: nn.Module, structures: Sequence[Any], batch_size: int = 16) -> list[np.ndarray]:
    """The student's forces (n, 3) in eV/Å for each structure, evaluated in batches."""
    student = frozen_copy(model)
    dtype = next(student.parameters()).dtype
    out: list[np.ndarray] = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        graphs = [atoms_to_graph(atoms, student.cutoff, with_labels=False, dtype=dtype) for atoms in chunk]
        batch = collate_atoms(graphs)
        forces = student(batch)[keys.FORCES].detach().double().numpy()
        offsets = np.cumsum([0] + [len(atoms) for atoms in chunk])
        out += [forces[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return out


def committee_deviation(models: Sequence[nn.Module], structures: Sequence[Any], batch_size: int = 16) -> np.ndarray:
    """Max per-atom force deviation of the committee ``models`` for each structure, eV/Å (shape (structures,)).

    Needs at least two models. A structure on which some member's forces are not finite scores ``inf``.
    """
    if len(models) < 2:
        raise ValueError(f"A committee needs at least two students, got {len(models)}.")
    if not structures:
        return np.zeros(0)
    with torch.no_grad():
        predictions = [predict_forces(model, structures, batch_size) for model in models]
    scores = np.empty(len(structures))
    for index in range(len(structures)):
        forces = np.stack([member[index] for member in predictions])  # (K, n, 3)
        if not np.isfinite(forces).all():
            scores[index] = np.inf
            continue
        spread = forces - forces.mean(axis=0, keepdims=True)
        scores[index] = float(np.sqrt((spread**2).sum(axis=-1).mean(axis=0)).max())
    return scores
