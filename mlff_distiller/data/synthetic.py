"""A self-contained toy force-field task: small clusters whose energy is a Morse pair potential.

It needs no files and no atomistic library, so the CLI's default job and the tests run anywhere.
Energies and forces are exact (forces = -dE/dx, computed in float64).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from . import keys


def morse_energy(
    positions: torch.Tensor, depth: float = 1.0, stiffness: float = 1.5, equilibrium: float = 1.2
) -> torch.Tensor:
    """Total Morse energy of each cluster; ``positions`` has shape (clusters, atoms, 3)."""
    n_atoms = positions.shape[-2]
    i, j = torch.triu_indices(n_atoms, n_atoms, offset=1, device=positions.device)
    r = (positions[..., i, :] - positions[..., j, :]).norm(dim=-1)
    pair = depth * ((1 - torch.exp(-stiffness * (r - equilibrium))) ** 2 - 1)
    return pair.sum(-1)


class MorseClusters(Dataset):
    """``num_structures`` jittered ``atoms_per_side``^3 grid clusters with Morse energies and forces."""

    def __init__(
        self, num_structures: int, atoms_per_side: int = 2, jitter: float = 0.25, spacing: float = 1.2, seed: int = 0
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        axis = torch.arange(atoms_per_side, dtype=torch.float64) * spacing
        grid = torch.cartesian_prod(axis, axis, axis)
        noise = jitter * torch.randn(num_structures, *grid.shape, generator=generator, dtype=torch.float64)
        positions = (grid + noise).requires_grad_(True)
        energy = morse_energy(positions)
        (grad,) = torch.autograd.grad(energy.sum(), positions)
        self.positions = positions.detach().float()
        self.energy = energy.detach().float()
        self.forces = (-grad).float()

    def __len__(self) -> int:
        return len(self.energy)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {keys.POSITIONS: self.positions[index], keys.ENERGY: self.energy[index], keys.FORCES: self.forces[index]}


class MorseClusterData:
    """Train/validation loaders over disjoint, seeded Morse-cluster sets."""

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 64,
        atoms_per_side: int = 2,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train={num_train} and num_val={num_val} must both be >= 1.")
        self.train_set = MorseClusters(num_train, atoms_per_side, seed=seed)
        self.val_set = MorseClusters(num_val, atoms_per_side, seed=seed + 1)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def train_loader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
