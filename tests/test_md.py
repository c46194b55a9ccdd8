"""Molecular dynamics with trained students: NVE (velocity Verlet) conserves the total energy.

A smooth student (cosine cutoff, forces = -dE/dx) must conserve energy whatever its accuracy; a
discontinuity at the cutoff or forces that are not the energy's gradient would show up as jumps or
a drift. The run is long enough (250 fs) for pairs to cross the cutoff many times.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from mlff_distiller.calculator import StudentCalculator
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.data.neighbors import neighbor_list
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.generate import build_default_dataset
from mlff_distiller.training import Trainer, TrainingConfig

torch.set_num_threads(1)

CUTOFF = 4.5  # Å: just inside the third fcc shell (~4.6 Å), so thermal motion moves pairs across it
STEPS = 250
TIMESTEP_FS = 1.0
MAX_DEVIATION_MEV_PER_ATOM = 0.2  # max |E_total(t) - E_total(0)| / atoms
MAX_DRIFT_MEV_PER_ATOM_PER_PS = 0.5  # slope of a linear fit of E_total(t) / atoms
MODELS = {"schnet": SchNet, "painn": PaiNN}
EPOCHS = {"schnet": 12, "painn": 8}


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(scope="module")
def data():
    path = build_default_dataset(num_structures=120, progress=False)
    return AtomsDataModule(
        path=str(path), cutoff=CUTOFF, num_val=10, num_test=10, batch_size=10, val_batch_size=10, seed=0
    )


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, data):
    """A small student trained for a few epochs (seconds), with the EMA weights it was validated with."""
    name = request.param
    _seed()
    model = MODELS[name](cutoff=CUTOFF, hidden=32, interactions=2, num_rbf=16, statistics=data.statistics)
    config = TrainingConfig(
        max_epochs=EPOCHS[name],
        batch_size=10,
        learning_rate=5e-3,
        lr_scheduler="cosine",
        grad_clip=10.0,
        ema_decay=0.99,
        monitor="val/force_mae",
        checkpoint_dir=None,
        device="cpu",
        seed=0,
    )
    trainer = Trainer(
        model, data.train_loader(), data.val_loader(), config=config, loss_fn=EnergyForceLoss(), loggers=[]
    )
    history = trainer.fit()
    model.load_state_dict(trainer.ema.averaged_state_dict(model))
    return name, model.eval(), history


def test_the_student_learned_the_teacher(trained, data):
    name, _, history = trained
    force_std = 1e3 * data.force_std("val")  # meV/Å, as the metrics
    maes = history["val/force_mae"]
    print(f"\n{name}: val force MAE {maes[0]:.0f} -> {maes[-1]:.0f} meV/Å, force std {force_std:.0f} meV/Å")
    assert 500 < force_std < 3000  # EMT Cu-Au forces, about 1 eV/Å
    assert maes[-1] < force_std / 3
    assert maes[-1] < maes[0]


def _alloy_cell(rng: np.random.Generator) -> object:
    """32-atom fcc Cu cell with 8 Au on random sites, at the Vegard lattice constant."""
    atoms = bulk("Cu", "fcc", a=0.75 * 3.61 + 0.25 * 4.08, cubic=True) * (2, 2, 2)
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(len(atoms))[:8]] = 79
    atoms.numbers = numbers
    return atoms


def test_nve_conserves_the_total_energy(trained):
    name, model, _ = trained
    rng = np.random.default_rng(2024)
    atoms = _alloy_cell(rng)
    atoms.calc = StudentCalculator(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # renamed in recent ASE
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    Stationary(atoms)
    n = len(atoms)
    total, potential, temperature, momentum, edges = [], [], [], [], []

    def observe():
        total.append(atoms.get_total_energy())
        potential.append(atoms.get_potential_energy())
        temperature.append(atoms.get_temperature())
        momentum.append(np.linalg.norm(atoms.get_momenta().sum(0)))
        edges.append(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, CUTOFF)[0].shape[1])

    dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    dynamics.attach(observe, interval=1)
    dynamics.run(STEPS)

    total_per_atom = 1e3 * np.array(total) / n  # meV/atom
    time_ps = TIMESTEP_FS * 1e-3 * np.arange(len(total))
    deviation = np.abs(total_per_atom - total_per_atom[0]).max()
    drift = np.polyfit(time_ps, total_per_atom, 1)[0]
    swing = 1e3 * (max(potential) - min(potential)) / n
    print(
        f"\n{name} NVE {STEPS} x {TIMESTEP_FS} fs: max |dE_total| {deviation:.4f} meV/atom, drift {drift:.4f} "
        f"meV/atom/ps, E_pot swing {swing:.1f} meV/atom, T {min(temperature):.0f}-{max(temperature):.0f} K, "
        f"edges {min(edges)}-{max(edges)}"
    )
    assert len(total) == STEPS + 1
    # The dynamics did something: kinetic and potential energy traded places, atoms crossed the cutoff.
    assert swing > 5.0
    assert 50 < min(temperature) and max(temperature) < 600
    assert len(set(edges)) > 5
    # ... while the total stayed put.
    assert deviation < MAX_DEVIATION_MEV_PER_ATOM
    assert abs(drift) < MAX_DRIFT_MEV_PER_ATOM_PER_PS
    assert deviation < swing / 50
    # Forces sum to zero: no momentum appears.
    assert max(momentum) < 1e-3 * np.sqrt(n * atoms.get_masses().mean() * units.kB * 300)
