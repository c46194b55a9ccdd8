"""Small EMT-labelled structures and files for the data tests (imported by the test modules; pytest
puts this directory on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def alloy_cell(seed: int, repeat: tuple[int, int, int] = (1, 1, 1), gold_fraction: float = 0.25) -> Atoms:
    """Cubic fcc Cu cell (4 atoms per repeat) with some Au, rattled; periodic."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(repeat)
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(len(atoms))[: int(round(gold_fraction * len(atoms)))]] = 79
    atoms.numbers = numbers
    atoms.positions += rng.normal(0.0, 0.08, size=atoms.positions.shape)
    return atoms


def triclinic_gold(seed: int) -> Atoms:
    """Primitive (triclinic) fcc Au cell repeated 2x2x1, one Cu, rattled; periodic."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Au", "fcc", a=4.08).repeat((2, 2, 1))
    atoms.numbers[0] = 29
    atoms.positions += rng.normal(0.0, 0.05, size=atoms.positions.shape)
    return atoms


def cluster(seed: int) -> Atoms:
    """A non-periodic, molecule-like 6-atom Cu-Au cluster (octahedron), rattled, no cell."""
    rng = np.random.default_rng(seed)
    d = 1.8
    positions = d * np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    atoms = Atoms("Cu4Au2", positions=positions + rng.normal(0.0, 0.05, size=(6, 3)), pbc=False)
    return atoms


def emt_labelled(structures: Sequence[Atoms]) -> tuple[list[Atoms], list[float], list[np.ndarray]]:
    """Attach EMT to copies of ``structures`` and evaluate it; returns (atoms, energies, forces)."""
    out, energies, forces = [], [], []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = EMT()
        energies.append(float(atoms.get_potential_energy()))
        forces.append(np.array(atoms.get_forces()))
        out.append(atoms)
    return out, energies, forces


def mixed_structures() -> list[Atoms]:
    """Rattled Cu/Au cells of different sizes and shapes plus a non-periodic cluster."""
    return [alloy_cell(0), alloy_cell(1, (2, 1, 1), 0.5), triclinic_gold(2), cluster(3), alloy_cell(4, (1, 1, 2), 0.0)]


def with_labels(atoms: Atoms, energy: float, forces: np.ndarray | None) -> Atoms:
    """A copy of ``atoms`` whose only labels are the given (possibly broken) calculator results."""
    atoms = atoms.copy()
    results = {"energy": energy} if forces is None else {"energy": energy, "forces": forces}
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def write_emt_file(path: Path, num: int, seed: int = 0) -> list[tuple[float, np.ndarray]]:
    """``num`` EMT-labelled alloy cells (4 or 8 atoms) written to ``path``; returns their labels in file order."""
    structures = [alloy_cell(seed + k, (1 + k % 2, 1, 1), gold_fraction=0.25 * (k % 3)) for k in range(num)]
    labelled, energies, forces = emt_labelled(structures)
    ase.io.write(path, labelled)
    return list(zip(energies, forces))
