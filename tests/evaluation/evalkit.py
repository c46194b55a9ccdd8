"""A mixed-size labelled data set for the evaluation tests: non-periodic Cu-Au octahedra of 19, 44 and 85
atoms next to periodic 32-atom fcc cells, labelled by EMT (imported by the test modules; pytest puts this
directory on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.cluster import Octahedron

CUTOFF = 4.0


def mixed_structures(count: int, seed: int = 0, elements: tuple[str, str] = ("Cu", "Au")) -> list[Atoms]:
    """``count`` EMT-labelled structures cycling through 19-, 44-, 85-atom clusters and 32-atom cells;
    ``info["config_type"]`` is ``cluster19`` ... or ``bulk``. A quarter of the atoms are ``elements[1]``."""
    from ase.data import atomic_numbers

    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        if k % 4 == 3:
            atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 2, 2))
            atoms.info["config_type"] = "bulk"
        else:
            atoms = Octahedron("Cu", 3 + k % 4, 0)
            atoms.info["config_type"] = f"cluster{len(atoms)}"
        numbers = np.full(len(atoms), atomic_numbers[elements[0]])
        numbers[rng.permutation(len(atoms))[: len(atoms) // 4]] = atomic_numbers[elements[1]]
        atoms.numbers = numbers
        atoms.positions += rng.normal(0.0, 0.06, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        if atoms.pbc.all():
            atoms.get_stress()
        out.append(atoms)
    return out


def write_mixed(path: Path, count: int, seed: int = 0, **kwargs) -> Path:
    ase.io.write(path, mixed_structures(count, seed, **kwargs))
    return path
