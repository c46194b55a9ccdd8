"""Physics of the SchNet and PaiNN students (float64): forces are -dE/dx, symmetries, smooth cutoff,
batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from atoms_testkit import (
    CUTOFF,
    assert_forces_are_minus_the_gradient,
    cu_au_cell,
    make_batch,
    methane,
    predict,
    random_rotation,
    small_model,
)

from mlff_distiller.data import keys
from mlff_distiller.data.statistics import DatasetStatistics

MODEL_NAMES = ["schnet", "painn"]
STRUCTURES = {"periodic": lambda: cu_au_cell(seed=3), "molecule": methane}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forces_are_minus_energy_gradient(name, structure, mode):
    model = small_model(name)
    model.train(mode == "train")
    batch = make_batch([STRUCTURES[structure]()])
    assert_forces_are_minus_the_gradient(model, batch)


def _compare(reference, other, perm=None, rotation=None):
    energy, forces = reference
    energy_2, forces_2 = other
    if rotation is not None:
        forces = forces @ torch.tensor(rotation).T
    if perm is not None:
        forces = forces[perm]
    torch.testing.assert_close(energy_2, energy, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(forces_2, forces, rtol=0, atol=1e-10)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rotation_translation_permutation_invariance(name, structure):
    model = small_model(name).eval()
    atoms = STRUCTURES[structure]()
    reference = predict(model, make_batch([atoms]))

    rotation = random_rotation(7)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    _compare(reference, predict(model, make_batch([rotated])), rotation=rotation)

    translated = atoms.copy()
    translated.positions = atoms.positions + np.array([0.37, -1.21, 2.05])
    _compare(reference, predict(model, make_batch([translated])))

    perm = np.random.default_rng(2).permutation(len(atoms))
    _compare(reference, predict(model, make_batch([atoms[perm]])), perm=torch.tensor(perm))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_wrapping_an_atom_across_the_cell_changes_nothing(name):
    model = small_model(name).eval()
    atoms = cu_au_cell(seed=4)
    reference = predict(model, make_batch([atoms]))
    wrapped = atoms.copy()
    wrapped.positions[0] += atoms.cell.array[0] - 2 * atoms.cell.array[2]
    wrapped.positions[5] -= atoms.cell.array[1]
    _compare(reference, predict(model, make_batch([wrapped])))


def _dimer(distance: float) -> Atoms:
    return Atoms("CuAu", positions=[[0.0, 0.0, 0.0], [distance * 0.6, distance * 0.8, 0.0]], pbc=False)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_energy_is_smooth_across_the_cutoff(name):
    statistics = DatasetStatistics(atomic_energies={29: -1.0, 79: -2.0}, force_rms=0.5, avg_num_neighbors=1)
    model = small_model(name, statistics=statistics).eval()
    reference = -3.0

    def evaluate(distance):
        batch = make_batch([_dimer(distance)])
        energy, forces = predict(model, batch)
        return float(energy[0]) - reference, forces, batch[keys.EDGE_INDEX].shape[1]

    # Beyond the cutoff: no edges; the reference energies only (to rounding), no forces.
    for distance in (CUTOFF + 1e-6, CUTOFF + 0.3):
        excess, forces, edges = evaluate(distance)
        assert edges == 0
        assert abs(excess) < 1e-12
        assert torch.count_nonzero(forces) == 0
    # Inside, the interaction energy vanishes at least like the cosine cutoff (~ delta²; PaiNN's sine
    # basis adds a factor delta) and the force at least like delta.
    excess_in, forces_in, edges = evaluate(CUTOFF - 0.5)
    assert edges == 2 and abs(excess_in) > 1e-8
    envelope = lambda r: 0.5 * (np.cos(np.pi * r / CUTOFF) + 1.0)  # noqa: E731
    ratios, force_norms = [], []
    for delta in (1e-2, 1e-3, 1e-4):
        excess, forces, edges = evaluate(CUTOFF - delta)
        assert edges == 2
        ratios.append(excess / envelope(CUTOFF - delta))
        force_norms.append(float(forces.norm()))
    assert ratios[0] != 0.0
    assert abs(ratios[1]) < 1.05 * abs(ratios[0]) and abs(ratios[2]) < 1.05 * abs(ratios[1])  # O(envelope)
    assert force_norms[1] < 0.15 * force_norms[0] and force_norms[2] < 0.15 * force_norms[1]
    # And the curve through the cutoff has no jump: its steps shrink steadily to zero at the cutoff.
    distances = np.linspace(CUTOFF - 0.05, CUTOFF + 0.05, 41)
    curve = np.array([evaluate(r)[0] for r in distances])
    steps = np.abs(np.diff(curve))
    inside = distances[1:] < CUTOFF
    assert np.all(np.diff(steps[inside]) < 0) and steps[inside][-1] < 0.15 * steps[0]
    assert np.abs(curve[distances >= CUTOFF]).max() < 1e-12


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_batch_matches_its_structures_alone(name):
    model = small_model(name).eval()
    structures = [cu_au_cell(seed=5), methane()]
    energy, forces = predict(model, make_batch(structures))
    start = 0
    for k, atoms in enumerate(structures):
        energy_alone, forces_alone = predict(model, make_batch([atoms]))
        torch.testing.assert_close(energy[k : k + 1], energy_alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(forces[start : start + len(atoms)], forces_alone, rtol=1e-12, atol=1e-12)
        start += len(atoms)
