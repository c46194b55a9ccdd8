"""Teacher Hessian rows: finite differences and autograd against the analytic Hessian of a Lennard-Jones
cluster; seeded row choice; storage round trip; resumable labelling with rows."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from mlff_distiller.teachers import label_structures, read_labelled
from mlff_distiller.teachers.hessian import (
    autograd_hessian_rows,
    choose_row_coords,
    finite_difference_hessian_rows,
    store_hessian_rows,
    stored_hessian_rows,
    teacher_hessian_rows,
)
from mlff_distiller.teachers.labelling import LabelFileMismatchError, complete_frames

EPSILON, SIGMA = 0.2, 2.3


def _pairs(positions: np.ndarray):
    i, j = np.triu_indices(len(positions), k=1)
    r = positions[j] - positions[i]
    return i, j, r, np.linalg.norm(r, axis=1)


def _lj_derivatives(d: np.ndarray):
    """phi(d), phi'(d), phi''(d) of 4 eps ((s/d)^12 - (s/d)^6)."""
    s6, s12 = (SIGMA / d) ** 6, (SIGMA / d) ** 12
    return 4 * EPSILON * (s12 - s6), 4 * EPSILON * (-12 * s12 + 6 * s6) / d, 4 * EPSILON * (156 * s12 - 42 * s6) / d**2


class LennardJonesPair(Calculator):
    """All-pairs Lennard-Jones (no cutoff, non-periodic), with its analytic Hessian."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        i, j, r, d = _pairs(self.atoms.positions)
        phi, dphi, _ = _lj_derivatives(d)
        pair_force = (dphi / d)[:, None] * r  # dE/dx_j for each pair
        forces = np.zeros((len(self.atoms), 3))
        np.add.at(forces, i, pair_force)
        np.add.at(forces, j, -pair_force)
        self.results = {"energy": float(phi.sum()), "forces": forces}

    @staticmethod
    def hessian(positions: np.ndarray) -> np.ndarray:
        """d^2E/dx dx, (3n, 3n): each pair adds K = phi'' u u^T + phi'/d (I - u u^T) to the ii and jj
        blocks and -K to the ij and ji blocks."""
        n = len(positions)
        i, j, r, d = _pairs(positions)
        _, dphi, d2phi = _lj_derivatives(d)
        u = r / d[:, None]
        uu = u[:, :, None] * u[:, None, :]
        blocks = d2phi[:, None, None] * uu + (dphi / d)[:, None, None] * (np.eye(3) - uu)
        hessian = np.zeros((n, 3, n, 3))
        for a, b, block in zip(i, j, blocks):
            hessian[a, :, a, :] += block
            hessian[b, :, b, :] += block
            hessian[a, :, b, :] -= block
            hessian[b, :, a, :] -= block
        return hessian.reshape(3 * n, 3 * n)


def lj_energy_torch(positions: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(positions), len(positions), offset=1)
    d = (positions[j] - positions[i]).norm(dim=1)
    return (4 * EPSILON * ((SIGMA / d) ** 12 - (SIGMA / d) ** 6)).sum()


class AutogradLennardJones(LennardJonesPair):
    """The same potential, but it computes its own Hessian rows (the teacher protocol)."""

    def __init__(self):
        super().__init__()
        self.row_calls = 0

    def hessian_rows(self, atoms, coords):
        self.row_calls += 1
        positions = torch.tensor(atoms.positions, dtype=torch.float64)
        return autograd_hessian_rows(lj_energy_torch, positions, coords).numpy()


def lj_cluster(seed: int = 0) -> Atoms:
    """A distorted 7-atom cluster near the LJ pair minimum (2^(1/6) sigma ~ 2.58 Å)."""
    rng = np.random.default_rng(seed)
    base = 2.6 * np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    return Atoms("Ar7", positions=base + rng.normal(0, 0.1, base.shape))


def test_finite_difference_rows_equal_the_analytic_hessian():
    atoms = lj_cluster()
    exact = LennardJonesPair.hessian(atoms.positions)
    coords = [0, 4, 11, 20]
    rows = finite_difference_hessian_rows(atoms, LennardJonesPair(), coords, delta=1e-3)
    assert rows.shape == (4, 21)
    scale = np.abs(exact).max()
    assert scale > 1.0  # eV/Å²: a stiff enough test
    error = np.abs(rows - exact[coords]).max()
    assert error < 2e-5 * scale, error  # O(delta²) truncation
    coarse = np.abs(finite_difference_hessian_rows(atoms, LennardJonesPair(), coords, delta=1e-2) - exact[coords])
    assert 20 * error < coarse.max() < 2e-3 * scale  # and it is O(delta²): 10x delta -> ~100x error
    # Translation invariance: every row sums to zero over each direction.
    np.testing.assert_allclose(rows.reshape(4, -1, 3).sum(axis=1), 0.0, atol=1e-8)


def test_autograd_rows_equal_the_analytic_hessian_and_replace_finite_differences():
    atoms = lj_cluster(1)
    exact = LennardJonesPair.hessian(atoms.positions)
    coords = np.array([2, 3, 17])
    calculator = AutogradLennardJones()
    rows = teacher_hessian_rows(atoms, calculator, coords)
    assert calculator.row_calls == 1
    np.testing.assert_allclose(rows, exact[coords], rtol=0, atol=1e-10)


def test_emt_rows_are_symmetric_and_translation_invariant():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    coords = [1, 14]
    rows = finite_difference_hessian_rows(atoms, EMT(), coords, delta=1e-3)
    assert rows[0, 14] == pytest.approx(rows[1, 1], abs=1e-4)
    np.testing.assert_allclose(rows.reshape(2, -1, 3).sum(axis=1), 0.0, atol=1e-6)
    assert rows[0, 1] > 1.0  # positive curvature on the diagonal near equilibrium


def test_row_choice_is_seeded_distinct_and_bounded():
    a = choose_row_coords(4, 5, seed=0, index=3)
    assert a.tolist() == choose_row_coords(4, 5, seed=0, index=3).tolist()
    assert len(set(a.tolist())) == 5 and a.min() >= 0 and a.max() < 12
    assert a.tolist() != choose_row_coords(4, 5, seed=0, index=4).tolist()
    assert len(choose_row_coords(2, 10, seed=0, index=0)) == 6  # capped at 3n


def test_stored_rows_round_trip_through_extxyz(tmp_path):
    atoms = lj_cluster()
    rows = np.random.default_rng(0).normal(size=(1, 21)) * 10
    store_hessian_rows(atoms, np.array([5]), rows)
    ase.io.write(tmp_path / "rows.extxyz", atoms)
    coords, back = stored_hessian_rows(ase.io.read(tmp_path / "rows.extxyz"))
    assert coords.tolist() == [5]
    np.testing.assert_allclose(back, rows, atol=1e-8)


def test_labelling_with_rows_is_resumable(alloy_structures, counting_emt, tmp_path):
    structures = [atoms[:8] for atoms in alloy_structures[:6]]  # 8-atom cells keep it fast
    reference = label_structures(
        structures, EMT(), tmp_path / "ref.extxyz", chunk_size=2, progress=False, hessian_rows=2
    )
    frames = read_labelled(reference)
    for index, (frame, atoms) in enumerate(zip(frames, structures)):
        coords, rows = stored_hessian_rows(frame)
        assert coords.tolist() == choose_row_coords(8, 2, 0, index).tolist()
        expected = finite_difference_hessian_rows(atoms, EMT(), coords)
        np.testing.assert_allclose(rows, expected, atol=1e-7)
        assert frame.get_forces().shape == (8, 3)  # the usual labels are still there

    output = tmp_path / "resumed.extxyz"
    calls_per_structure = 1 + 2 * 2  # energy+forces, then 2 calls per row
    dying = counting_emt(fail_after=3 * calls_per_structure + 2)  # dies inside structure 3's rows
    with pytest.raises(RuntimeError, match="simulated interruption"):
        label_structures(structures, dying, output, chunk_size=2, progress=False, hessian_rows=2)
    assert complete_frames(output)[0] == 3
    resumed = counting_emt()
    label_structures(structures, resumed, output, chunk_size=2, progress=False, hessian_rows=2)
    assert resumed.calls == 3 * calls_per_structure
    assert output.read_bytes() == reference.read_bytes()
    # The same file asked for with another number of rows is refused, not silently mixed.
    with pytest.raises(LabelFileMismatchError, match="2 Hessian rows stored, 3 requested"):
        label_structures(structures, EMT(), output, progress=False, hessian_rows=3)
    with pytest.raises(LabelFileMismatchError, match="2 Hessian rows stored, 0 requested"):
        label_structures(structures, EMT(), output, progress=False)
