"""`compute_statistics`: least-squares reference energies, force RMS and neighbour count by hand."""

from __future__ import annotations

import numpy as np
import pytest
from datakit import alloy_cell, cluster, triclinic_gold

from mlff_distiller.data import keys
from mlff_distiller.data.dataset import atoms_to_graph
from mlff_distiller.data.statistics import compute_statistics

REFERENCE = {29: -3.25, 79: -1.5, 46: 0.75}  # eV per atom: Cu, Au, Pd


def _structures():
    rng = np.random.default_rng(0)
    out = []
    for k in range(12):
        atoms = [alloy_cell(k, (1 + k % 2, 1, 1), 0.25 * (k % 4)), triclinic_gold(k), cluster(k)][k % 3]
        numbers = atoms.numbers.copy()
        numbers[rng.random(len(numbers)) < 0.2] = 46  # some Pd, so three elements vary independently
        atoms.numbers = numbers
        out.append(atoms)
    return out


def _items(noise: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    items = []
    for atoms in _structures():
        atoms.info["_energy"] = sum(REFERENCE[int(z)] for z in atoms.numbers) + noise * rng.standard_normal()
        atoms.arrays["_forces"] = rng.normal(0.0, 0.7, size=(len(atoms), 3))
        items.append(atoms_to_graph(atoms, cutoff=3.5))
    return items


def test_reference_energies_are_recovered_exactly_without_noise():
    items = _items(noise=0.0)
    statistics = compute_statistics(items)
    assert set(statistics.atomic_energies) == set(REFERENCE)
    for z, energy in REFERENCE.items():
        # Labels are float32 (the default dtype): exact up to that precision.
        assert statistics.atomic_energies[z] == pytest.approx(energy, abs=1e-5)
    assert statistics.energy_residual_std_per_atom < 1e-6
    assert statistics.num_structures == len(items)


def test_reference_energies_with_tiny_noise_and_the_residual_spread():
    items = _items(noise=1e-3)
    statistics = compute_statistics(items)
    for z, energy in REFERENCE.items():
        assert statistics.atomic_energies[z] == pytest.approx(energy, abs=2e-3)
    # Residual per atom by hand, from the same least-squares fit done here with numpy.
    elements = sorted(REFERENCE)
    counts = np.array([[int((np.asarray(g[keys.ATOMIC_NUMBERS]) == z).sum()) for z in elements] for g in items])
    energies = np.array([float(g[keys.ENERGY]) for g in items])
    solution = np.linalg.lstsq(counts, energies, rcond=None)[0]
    residual = (energies - counts @ solution) / counts.sum(1)
    assert statistics.energy_residual_std_per_atom == pytest.approx(residual.std(), rel=1e-6)
    assert 0 < statistics.energy_residual_std_per_atom < 1e-3


def test_force_rms_and_average_neighbour_count_by_hand():
    items = _items(noise=0.0)
    statistics = compute_statistics(items)
    forces = np.concatenate([np.asarray(g[keys.FORCES], dtype=np.float64).reshape(-1) for g in items])
    assert statistics.force_rms == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-6)
    edges = sum(g[keys.EDGE_INDEX].shape[1] for g in items)
    atoms = sum(len(g[keys.ATOMIC_NUMBERS]) for g in items)
    assert statistics.avg_num_neighbors == pytest.approx(edges / atoms, rel=1e-12)
    assert 1 < statistics.avg_num_neighbors < 30


def test_absent_elements_get_no_entry_and_to_dict_is_plain():
    items = [g for g in _items(noise=0.0) if 46 not in g[keys.ATOMIC_NUMBERS].tolist()]
    assert len(items) >= 2
    statistics = compute_statistics(items)
    assert 46 not in statistics.atomic_energies
    plain = statistics.to_dict()
    assert all(type(k) is int and type(v) is float for k, v in plain["atomic_energies"].items())
    assert plain["num_structures"] == len(items)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        compute_statistics([])
