"""Small students and structures for the MD tests: random-weight SchNet/PaiNN (engine agreement, export) and a
Morse pair "student" (a stable crystal for thermostat statistics), plus checkpoints the CLIs can read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from torch import nn

from mlff_distiller.data import keys
from mlff_distiller.data.statistics import DatasetStatistics
from mlff_distiller.models.base import AtomisticModel, cosine_cutoff
from mlff_distiller.models.common import scatter_sum
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.training import Trainer, TrainingConfig

CUTOFF = 4.0
STATISTICS = DatasetStatistics(atomic_energies={29: -3.5, 79: -3.0}, force_rms=0.8, avg_num_neighbors=18.0)


class MorseStudent(AtomisticModel):
    """E = 1/2 sum_ij D [(1 - exp(-a (r_ij - r0)))² - 1] fc(r_ij) (Cu, Girifalco-Weizer), fc the cosine cutoff.

    An analytic student: it goes through the same code paths as a trained one (neighbour lists, forces and
    stress by autograd, element checks) and keeps an fcc crystal stable, so thermostats can be tested on it.
    """

    def __init__(self, cutoff: float = 5.5, depth: float = 0.3429, alpha: float = 1.3588, r0: float = 2.866) -> None:
        super().__init__(cutoff)
        self.depth, self.alpha, self.r0 = depth, alpha, r0
        self.trained_elements[29] = True

    def atomic_outputs(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        distances = torch.linalg.vector_norm(vectors, dim=-1)
        pair = self.depth * ((1 - torch.exp(-self.alpha * (distances - self.r0))) ** 2 - 1)
        return 0.5 * scatter_sum(pair * cosine_cutoff(distances, self.cutoff), batch[keys.EDGE_INDEX][0],
                                 batch[keys.ATOMIC_NUMBERS].shape[0])  # fmt: skip


def student(name: str = "schnet", seed: int = 0, **kwargs) -> nn.Module:
    """A random-weight student on Cu-Au (its element record: Cu, Au)."""
    torch.manual_seed(seed)
    cls = {"schnet": SchNet, "painn": PaiNN}[name]
    options = {"cutoff": CUTOFF, "hidden": 16, "interactions": 2, "num_rbf": 8, "statistics": STATISTICS, **kwargs}
    return cls(**options).eval()


def alloy(repeat: int = 2, seed: int = 0, rattle: float = 0.05) -> Atoms:
    """A Cu-Au fcc cell (4 repeat³ atoms, a quarter Au), rattled."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (repeat, repeat, repeat)
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(len(atoms))[: len(atoms) // 4]] = 79
    atoms.numbers = numbers
    atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
    return atoms


def copper(repeat: int = 2) -> Atoms:
    """A Cu fcc cell at the Morse student's near-equilibrium lattice constant."""
    return bulk("Cu", "fcc", a=3.61, cubic=True) * (repeat, repeat, repeat)


def cluster(seed: int = 1) -> Atoms:
    """A non-periodic 7-atom Cu-Au cluster."""
    rng = np.random.default_rng(seed)
    positions = 2.3 * np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    return Atoms("Cu5Au2", positions=positions + rng.normal(0.0, 0.1, size=(7, 3)), pbc=False)


def save_student_checkpoint(model: nn.Module, model_config: dict, path: Path) -> Path:
    """An mlff-train-style checkpoint (model weights and the config that rebuilds the model)."""
    config = TrainingConfig(max_epochs=1, checkpoint_dir=None, device="cpu", extra={"model_config": model_config})
    trainer = Trainer(model, [], config=config, loggers=[], loss_fn=lambda m, b: m(b)[keys.ENERGY].sum())
    return trainer.save_checkpoint(path)


def student_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A checkpoint of :func:`student` ("schnet") in ``directory``."""
    model = student("schnet", seed=seed)
    config = {"_target_": "mlff_distiller.models.schnet.SchNet", "cutoff": CUTOFF, "hidden": 16, "interactions": 2,
              "num_rbf": 8}  # fmt: skip
    return save_student_checkpoint(model, config, directory / "student.pt")
