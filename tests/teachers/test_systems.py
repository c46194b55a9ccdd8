"""The built-in water box: composition, density, distance bounds, rigid molecules, seeding; and its name."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units

from mlff_distiller.teachers.sampling import seed_structures
from mlff_distiller.teachers.systems import box_length, water_box


def _molecule_of(atoms) -> np.ndarray:
    return np.arange(len(atoms)) // 3


def _intermolecular(atoms) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-image distances between atoms of different molecules, and whether both atoms are oxygens."""
    distances = atoms.get_all_distances(mic=True)
    molecule = _molecule_of(atoms)
    i, j = np.triu_indices(len(atoms), k=1)
    other = molecule[i] != molecule[j]
    oxygen = (atoms.numbers[i] == 8) & (atoms.numbers[j] == 8)
    return distances[i, j][other], oxygen[other]


def test_composition_cell_and_density():
    atoms = water_box(36, density_g_cm3=1.0, seed=0)
    assert len(atoms) == 108 and atoms.get_chemical_formula() == "H72O36"
    assert list(atoms.symbols[:6]) == ["O", "H", "H", "O", "H", "H"]
    assert atoms.pbc.all()
    np.testing.assert_allclose(atoms.cell.array, np.eye(3) * atoms.cell[0, 0])
    grams_per_cm3 = atoms.get_masses().sum() / units._Nav / (atoms.get_volume() * 1e-24)
    assert grams_per_cm3 == pytest.approx(1.0, rel=1e-12)
    assert atoms.cell[0, 0] == pytest.approx(10.26, abs=0.01) == box_length(36, 1.0)
    scaled = atoms.get_scaled_positions(wrap=False)
    assert scaled.min() >= 0 and scaled.max() < 1  # wrapped into the cell
    dense = water_box(16, density_g_cm3=1.1, seed=1)
    assert dense.get_masses().sum() / units._Nav / (dense.get_volume() * 1e-24) == pytest.approx(1.1, rel=1e-12)


def test_molecules_are_rigid_and_keep_the_distance_bounds():
    for count, seed in ((8, 0), (36, 1)):
        atoms = water_box(count, seed=seed)
        for first in range(0, len(atoms), 3):
            assert atoms.get_distance(first, first + 1, mic=True) == pytest.approx(0.9686, abs=1e-4)
            assert atoms.get_distance(first, first + 2, mic=True) == pytest.approx(0.9686, abs=1e-4)
            assert atoms.get_angle(first + 1, first, first + 2, mic=True) == pytest.approx(104.0, abs=0.01)
        distances, oxygen = _intermolecular(atoms)
        assert distances.min() >= 1.7
        assert distances[oxygen].min() >= 2.5
    strict = water_box(12, seed=2, min_distance=1.8, min_oxygen_distance=2.6)
    distances, oxygen = _intermolecular(strict)
    assert distances.min() >= 1.8 and distances[oxygen].min() >= 2.6


def test_the_seed_decides_the_box():
    first, again, other = water_box(12, seed=5), water_box(12, seed=5), water_box(12, seed=6)
    np.testing.assert_array_equal(first.positions, again.positions)
    assert np.abs(first.positions - other.positions).max() > 0.5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_molecules=0"):
        water_box(0)
    with pytest.raises(ValueError, match="density_g_cm3=-1"):
        water_box(8, density_g_cm3=-1.0)
    with pytest.raises(ValueError, match="own periodic images"):
        water_box(1)  # a 3.1 Å box: a molecule would touch its own image
    with pytest.raises(RuntimeError, match="could not place 36 molecules"):
        water_box(36, density_g_cm3=2.5, max_attempts=50, max_restarts=1)


def test_sampler_knows_water_by_name_and_h2o_stays_the_molecule():
    boxes = seed_structures("water", min_atoms=36, num_seeds=3, seed=0)
    assert [len(atoms) for atoms in boxes] == [36, 36, 36]
    assert all(atoms.pbc.all() for atoms in boxes)
    assert [atoms.info["provenance"] for atoms in boxes] == [f"seed:water=12:index={k}" for k in range(3)]
    assert np.abs(boxes[0].positions - boxes[1].positions).max() > 0.5
    again = seed_structures("water", min_atoms=36, num_seeds=3, seed=0)
    np.testing.assert_array_equal(boxes[2].positions, again[2].positions)
    assert len(seed_structures("water", min_atoms=108, num_seeds=1)[0]) == 108
    single = seed_structures("H2O")[0]
    assert len(single) == 3 and not single.pbc.any()
