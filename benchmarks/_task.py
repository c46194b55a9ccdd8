"""The default job's task, built once for the benchmark scripts: the default Cu-Au EMT set (from the
dataset cache), the default SchNet/PaiNN student with stress, and the default loss (weights 10/30/1).
Mirrors conf/ (data/cuau_alloy, model/*, loss/energy_force, trainer/default), except the batch: 32 structures,
the default job's until 2026-11-30 (now 4), kept so that step times stay comparable with earlier tables; not a
benchmark itself."""

from __future__ import annotations

import torch

CUTOFF = 5.0
BATCH_SIZE = 32
LEARNING_RATE = 5e-3
GRAD_CLIP = 10.0
EMA_DECAY = 0.99
_DATA: dict[tuple, object] = {}


def data_module(num_train: int | None = None, num_val: int = 100, batch_size: int = BATCH_SIZE, num_workers: int = 0):
    """`AtomsDataModule` of the default job (1,100 structures, MD-run split), training set capped at ``num_train``."""
    from mlff_distiller.data.module import AtomsDataModule
    from mlff_distiller.teachers.generate import build_default_dataset

    key = (num_train, num_val, batch_size, num_workers)
    if key not in _DATA:
        path = build_default_dataset(num_structures=1100, seed=0, progress=False)
        _DATA[key] = AtomsDataModule(
            path=str(path),
            cutoff=CUTOFF,
            num_val=num_val,
            num_test=200,
            num_train=num_train,
            batch_size=batch_size,
            val_batch_size=50,
            num_workers=num_workers,
            group_key="md_run",
        )
    return _DATA[key]


def student(name: str, data, seed: int = 0) -> torch.nn.Module:
    """The default student of that name (64 features, 3 interactions), with stress, on the data's statistics."""
    from mlff_distiller.models.painn import PaiNN
    from mlff_distiller.models.schnet import SchNet

    torch.manual_seed(seed)
    model = {"schnet": SchNet, "painn": PaiNN}[name]
    return model(cutoff=CUTOFF, statistics=data.statistics, compute_stress=True)


def loss_function():
    from mlff_distiller.losses.energy_force import EnergyForceLoss

    return EnergyForceLoss(energy_weight=10.0, force_weight=30.0, stress_weight=1.0)


# ---------------------------------------------------------------------- the light task
LIGHT_MOLECULES = (
    "CH3OH",
    "C2H4",
    "CH3CHO",
    "H3CNH2",
    "C2H6",
    "CH3COOH",
    "CH3CH2OH",
    "C4H4O",
    "CH3COCH3",
    "C5H5N",
    "C6H6",
    "trans-butane",
)
"""Small closed-shell molecules of ASE's G2 set (6-14 atoms of H, C, N, O: elements EMT has parameters for)."""


def light_data_module(directory, num_train: int = 960, num_val: int = 96, batch_size: int = 32):
    """A light task's data: rattled small molecules (9 atoms on average), EMT-labelled into ``directory``.

    A SchNet 64x3 step on a batch of 32 of them takes about 20 ms on one thread (the default job's: ~200 ms),
    so per-step costs of the training loop that a heavy step hides show here.
    """
    from pathlib import Path

    import numpy as np
    from ase.build import molecule
    from ase.calculators.emt import EMT

    from mlff_distiller.data.module import AtomsDataModule
    from mlff_distiller.teachers import label_structures

    key = ("light", num_train, num_val, batch_size)
    if key not in _DATA:
        rng = np.random.default_rng(0)
        structures = []
        for index in range(num_train + num_val):
            atoms = molecule(LIGHT_MOLECULES[index % len(LIGHT_MOLECULES)])
            atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)  # thermal-size displacements, Å
            structures.append(atoms)
        path = label_structures(structures, EMT(), Path(directory) / "light_molecules.extxyz", progress=False)
        _DATA[key] = AtomsDataModule(
            path=str(path),
            cutoff=CUTOFF,
            num_val=num_val,
            num_test=0,
            batch_size=batch_size,
            val_batch_size=50,
        )
    return _DATA[key]


def light_student(data, seed: int = 0) -> torch.nn.Module:
    """The light task's student: the default SchNet 64x3, without stress (molecules have no cell)."""
    from mlff_distiller.models.schnet import SchNet

    torch.manual_seed(seed)
    return SchNet(cutoff=CUTOFF, statistics=data.statistics)


def light_loss_function():
    from mlff_distiller.losses.energy_force import EnergyForceLoss

    return EnergyForceLoss(energy_weight=10.0, force_weight=30.0)
