"""`StudentPotential`: reused neighbour lists give the fresh-list answer, batches equal one-at-a-time calls, and
bad inputs and unseen elements are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from md_kit import alloy, cluster, student

from mlff_distiller.md.potential import StudentPotential
from mlff_distiller.models.base import UnknownElementError

torch.set_num_threads(1)


def _outputs(potential: StudentPotential, atoms, **kwargs) -> dict[str, np.ndarray]:
    out = potential(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, stress=True, **kwargs)
    return {key: value.numpy() for key, value in out.items()}


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_reused_neighbour_lists_give_the_fresh_list_result(name):
    model = student(name)
    skin = 0.6
    reused = StudentPotential(model, dtype=torch.float64, skin=skin)
    fresh = StudentPotential(model, dtype=torch.float64, skin=0.0)
    atoms = alloy(seed=3)
    rng = np.random.default_rng(0)
    builds = []
    for step in range(12):
        # A random walk of 0.06 Å per atom per step: lists go stale every few steps.
        atoms.positions += rng.normal(0.0, 0.06 / np.sqrt(3), size=atoms.positions.shape)
        if step == 5:  # an engine wraps two atoms back into the cell: the same structure
            atoms.positions[[0, 7]] += atoms.cell.array[0] - 2 * atoms.cell.array[2]
        got, expected = _outputs(reused, atoms), _outputs(fresh, atoms)
        assert abs(got["energy"][0] - expected["energy"][0]) < 1e-11
        np.testing.assert_allclose(got["forces"], expected["forces"], rtol=0, atol=1e-11)
        np.testing.assert_allclose(got["stress"], expected["stress"], rtol=0, atol=1e-12)
        builds.append(reused.stats.builds)
    assert np.abs(expected["forces"]).max() > 1e-2  # a meaningful comparison (1e9 x the tolerance)
    # Lists were reused (not rebuilt every call) and rebuilt once atoms had moved more than skin / 2.
    assert 1 < builds[-1] < 12
    assert fresh.stats.builds == 12


def test_a_list_is_kept_until_an_atom_moved_half_the_skin():
    potential = StudentPotential(student(), dtype=torch.float64, skin=1.0)
    atoms = alloy()
    _outputs(potential, atoms)
    assert potential.stats.builds == 1
    atoms.positions[3] += [0.49, 0.0, 0.0]
    _outputs(potential, atoms)
    assert potential.stats.builds == 1
    atoms.positions[3] += [0.02, 0.0, 0.0]  # 0.51 Å from where the list was built
    _outputs(potential, atoms)
    assert potential.stats.builds == 2
    atoms.set_cell(atoms.cell.array * 1.001, scale_atoms=True)  # a new cell: a new list
    _outputs(potential, atoms)
    assert potential.stats.builds == 3


def test_a_batch_of_systems_equals_one_system_at_a_time():
    model = student("painn")
    systems = [alloy(seed=1), cluster(), alloy(seed=2, rattle=0.1)]
    systems[2].set_cell(systems[2].cell.array * 1.02, scale_atoms=True)
    batched = StudentPotential(model, dtype=torch.float64, skin=0.5)
    out = batched(
        np.concatenate([a.positions for a in systems]),
        np.concatenate([a.numbers for a in systems]),
        np.stack([a.cell.array for a in systems]),
        np.stack([a.pbc for a in systems]),
        num_atoms=[len(a) for a in systems],
        stress=True,
    )
    assert batched.stats.builds == 3
    start = 0
    for index, atoms in enumerate(systems):
        single = _outputs(StudentPotential(model, dtype=torch.float64), atoms)
        assert out["energy"][index].item() == pytest.approx(single["energy"][0], abs=1e-10)
        forces = out["forces"][start : start + len(atoms)].numpy()
        np.testing.assert_allclose(forces, single["forces"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(out["stress"][index].numpy(), single["stress"][0], rtol=0, atol=1e-12)
        start += len(atoms)
    # Moving the atoms of one system past skin / 2 rebuilds that system's list only.
    positions = np.concatenate([a.positions for a in systems])
    positions[len(systems[0])] += [0.3, 0.0, 0.0]
    batched(
        positions,
        np.concatenate([a.numbers for a in systems]),
        np.stack([a.cell.array for a in systems]),
        np.stack([a.pbc for a in systems]),
        num_atoms=[len(a) for a in systems],
    )
    assert batched.stats.builds == 4


def test_unseen_elements_and_inconsistent_inputs_are_refused():
    potential = StudentPotential(student())
    atoms = alloy()
    atoms.numbers[0] = 47
    with pytest.raises(UnknownElementError, match="contains Ag, which the student was never trained on"):
        potential(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
    with pytest.raises(ValueError, match="32 positions, 31 atomic numbers"):
        potential(atoms.positions, atoms.numbers[:-1], atoms.cell.array, atoms.pbc)
    with pytest.raises(ValueError, match="skin=-1"):
        StudentPotential(student(), skin=-1.0)


def test_non_finite_positions_give_nan_not_a_number():
    potential = StudentPotential(student(), dtype=torch.float64)
    atoms = alloy()
    assert np.isfinite(_outputs(potential, atoms)["energy"]).all()
    atoms.positions[4] = np.nan
    out = _outputs(potential, atoms)
    assert np.isnan(out["energy"]).all() and np.isnan(out["forces"]).all() and np.isnan(out["stress"]).all()
    assert potential.stats.nonfinite_calls == 1
