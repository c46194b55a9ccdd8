"""Stress = (1/V) dE/dstrain: students against finite differences, the loss term, labels end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from mlff_distiller.calculator import StudentCalculator
from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import atoms_to_graph, read_labelled_structures
from mlff_distiller.data.statistics import DatasetStatistics
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.labelling import label_structures

torch.set_num_threads(1)
STATS = DatasetStatistics(atomic_energies={29: -1.0, 79: -2.0}, force_rms=0.5, avg_num_neighbors=30.0)
STRAIN = np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.005], [0.0, 0.0, 0.02]])


def alloy_cell():
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 1)
    atoms.numbers[:3] = 79
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + STRAIN), scale_atoms=True)  # triclinic, strained
    atoms.rattle(0.05, seed=1)
    return atoms


def energy_of(model, atoms) -> float:
    return model(collate_atoms([atoms_to_graph(atoms, model.cutoff, False, torch.float64)]))[keys.ENERGY].item()


@pytest.mark.parametrize("model_class", [SchNet, PaiNN])
def test_stress_is_the_strain_derivative_of_the_energy(model_class):
    torch.manual_seed(0)
    model = model_class(cutoff=4.0, statistics=STATS, compute_stress=True).double().eval()
    atoms = alloy_cell()
    stress = model(collate_atoms([atoms_to_graph(atoms, 4.0, False, torch.float64)]))[keys.STRESS][0].detach()
    step, expected = 1e-5, np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            strain = np.zeros((3, 3))
            strain[i, j] += step / 2
            strain[j, i] += step / 2
            energies = []
            for sign in (1, -1):
                deformed = atoms.copy()
                deformed.set_cell(atoms.cell.array @ (np.eye(3) + sign * strain), scale_atoms=True)
                energies.append(energy_of(model, deformed))
            expected[i, j] = (energies[0] - energies[1]) / (2 * step) / atoms.get_volume()
    assert np.abs(stress.numpy()).max() > 1e-4
    np.testing.assert_allclose(stress.numpy(), expected, atol=1e-8)
    np.testing.assert_allclose(stress.numpy(), stress.numpy().T, atol=1e-12)


def test_calculator_stress_matches_the_model_and_follows_ase_conventions():
    torch.manual_seed(0)
    model = SchNet(cutoff=4.0, statistics=STATS)
    atoms = alloy_cell()
    atoms.calc = StudentCalculator(model, dtype=torch.float64)
    voigt = atoms.get_stress()
    model.compute_stress = True
    full = model.double()(collate_atoms([atoms_to_graph(atoms, 4.0, False, torch.float64)]))[keys.STRESS][0]
    full = full.detach().numpy()
    np.testing.assert_allclose(
        voigt, [full[0, 0], full[1, 1], full[2, 2], full[1, 2], full[0, 2], full[0, 1]], atol=1e-10
    )


def test_stress_labels_travel_from_teacher_to_batch(tmp_path):
    """EMT stress is written by the labeller, read by the dataset as a 3x3 matrix and batched."""
    structures = [alloy_cell() for _ in range(3)]
    for seed, atoms in enumerate(structures):
        atoms.rattle(0.02, seed=seed + 10)
    path = label_structures(structures, EMT(), tmp_path / "labelled.extxyz", progress=False)
    read = read_labelled_structures(path)
    reference = structures[1].copy()
    reference.calc = EMT()
    np.testing.assert_allclose(read[1].info["_stress"], reference.get_stress(voigt=False), atol=1e-8)
    batch = collate_atoms([atoms_to_graph(atoms, 4.0) for atoms in read])
    assert batch[keys.STRESS].shape == (3, 3, 3)


def test_loss_stress_term_uses_the_virial_per_atom_and_needs_a_stress_model():
    atoms = alloy_cell()
    atoms.calc = EMT()
    atoms.info["_energy"] = atoms.get_potential_energy()
    atoms.arrays["_forces"] = atoms.get_forces()
    atoms.info["_stress"] = atoms.get_stress(voigt=False)
    batch = collate_atoms([atoms_to_graph(atoms, 4.0)])
    torch.manual_seed(0)
    model = SchNet(cutoff=4.0, statistics=STATS, compute_stress=True)
    with_stress = EnergyForceLoss(energy_weight=1.0, force_weight=1.0, stress_weight=2.0)(model, batch)
    without = EnergyForceLoss(energy_weight=1.0, force_weight=1.0)(model, batch)
    predicted = model(batch)
    virial_error = (predicted[keys.STRESS] - batch[keys.STRESS]) * atoms.get_volume() / len(atoms)
    expected = without["loss"] + 2.0 * virial_error.pow(2).mean()
    torch.testing.assert_close(with_stress["loss"], expected, rtol=1e-5, atol=1e-8)
    stress_mae = with_stress["stress_mae"]  # exact (total, count) over the 9 components
    assert float(stress_mae.count) == 9
    assert float(stress_mae.total / stress_mae.count) == pytest.approx(
        1e3 * (predicted[keys.STRESS] - batch[keys.STRESS]).abs().mean().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="compute_stress=True"):
        EnergyForceLoss(stress_weight=1.0)(SchNet(cutoff=4.0, statistics=STATS), batch)


def test_geometry_stays_in_full_precision_under_bf16_autocast():
    """Edge vectors (cell shifts, strain) are computed in float32 even inside a bf16 autocast region."""
    atoms = alloy_cell()
    batch = collate_atoms([atoms_to_graph(atoms, 4.0, False)])
    seen = []
    model = SchNet(cutoff=4.0, statistics=STATS, compute_stress=True)
    original = model.atomic_outputs

    def spy(batch, vectors):
        seen.append(vectors.detach().clone())
        return original(batch, vectors)

    model.atomic_outputs = spy
    model(batch)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = model(batch)
    assert seen[1].dtype == torch.float32
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    assert output[keys.ENERGY].dtype == torch.float32 and output[keys.STRESS].dtype == torch.float32
