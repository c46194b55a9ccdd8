"""Small structures and batches for the model tests (imported by the test modules; pytest puts this
directory on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from mlff_distiller.data import keys
from mlff_distiller.data.batch import AtomsBatch, collate_atoms
from mlff_distiller.data.dataset import atoms_to_graph
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet

CUTOFF = 4.0
"""Between the 2nd (3.6 Å) and 3rd (4.4 Å) neighbour shells of the Cu cell: ~18 neighbours per atom."""

MODELS: dict[str, type] = {"schnet": SchNet, "painn": PaiNN}


def small_model(name: str, cutoff: float = CUTOFF, **kwargs) -> torch.nn.Module:
    """A small float64 student (fast enough for finite differences)."""
    options = {"cutoff": cutoff, "hidden": 16, "interactions": 2, "num_rbf": 8, **kwargs}
    return MODELS[name](**options).double()


def cu_au_cell(seed: int = 0, gold: int = 4, rattle: float = 0.1) -> Atoms:
    """32-atom fcc Cu cell (a = 3.6 Å) with ``gold`` atoms turned into Au, rattled."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    rng = np.random.default_rng(seed)
    symbols = atoms.get_chemical_symbols()
    for index in rng.choice(len(atoms), gold, replace=False):
        symbols[index] = "Au"
    atoms.set_chemical_symbols(symbols)
    atoms.rattle(rattle, seed=seed)
    return atoms


def methane() -> Atoms:
    """Non-periodic CH4, slightly distorted so no force vanishes by symmetry."""
    atoms = molecule("CH4")
    atoms.rattle(0.05, seed=1)
    return atoms


def to_item(
    atoms: Atoms, cutoff: float = CUTOFF, dtype: torch.dtype = torch.float64, labels: bool = False
) -> dict[str, torch.Tensor]:
    """The per-structure dict :func:`collate_atoms` expects, with a fresh neighbour list."""
    item = atoms_to_graph(atoms, cutoff, with_labels=False, dtype=dtype)
    if labels:
        item[keys.ENERGY] = torch.tensor(atoms.get_potential_energy(), dtype=dtype)
        item[keys.FORCES] = torch.tensor(atoms.get_forces(), dtype=dtype)
    return item


def make_batch(
    structures: Sequence[Atoms], cutoff: float = CUTOFF, dtype: torch.dtype = torch.float64, labels: bool = False
) -> AtomsBatch:
    return collate_atoms([to_item(atoms, cutoff, dtype, labels) for atoms in structures])


def predict(model: torch.nn.Module, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (energy, forces)."""
    out = model(batch)
    return out[keys.ENERGY].detach(), out[keys.FORCES].detach()


def energy_function(model: torch.nn.Module, batch: AtomsBatch) -> Callable[[torch.Tensor], float]:
    """Total energy of the batch at other positions, same neighbour list."""

    def energy(positions: torch.Tensor) -> float:
        return float(model(batch.replace(**{keys.POSITIONS: positions}))[keys.ENERGY].detach().sum())

    return energy


def assert_forces_are_minus_the_gradient(model: torch.nn.Module, batch: AtomsBatch) -> None:
    """Central differences of the energy (eps 1e-5 Å) along 3 random directions and 4 single coordinates equal
    -F.d within 1e-6 of the force scale (float64, on the batch's device)."""
    _, forces = predict(model, batch)
    energy = energy_function(model, batch)
    positions = batch[keys.POSITIONS]
    device = positions.device
    scale = float(forces.pow(2).mean().sqrt())
    assert scale > 1e-6, "forces vanish: the check below would be vacuous"
    rng = np.random.default_rng(1)
    eps = 1e-5
    directions = [torch.tensor(rng.normal(size=positions.shape), device=device) for _ in range(3)]
    for index in rng.choice(positions.numel(), 4, replace=False):  # a few single coordinates as well
        unit = torch.zeros(positions.numel(), dtype=positions.dtype, device=device)
        unit[index] = 1.0
        directions.append(unit.view_as(positions))
    for d in directions:
        d = d / d.norm()
        numeric = (energy(positions + eps * d) - energy(positions - eps * d)) / (2 * eps)
        analytic = -float((forces * d).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), scale), (numeric, analytic)


def random_rotation(seed: int) -> np.ndarray:
    """A proper rotation matrix (det = +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
