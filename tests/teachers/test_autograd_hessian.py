"""Autograd Hessian rows of the torch teachers (CHGNet, SevenNet) against finite differences of their own
forces, and labelling with them (method recorded, calls counted, site energies). Skipped where the
packages are missing (CI does not install them); benchmarks/teacher_hessian.py prints the figures.

Tolerances (measured on this cell: benchmarks/README.md): central differences have an O(delta²) error
until float32 noise, ~1e-5 eV/Å / delta, takes over. SevenNet's energy is smooth on the scale of the
displacements: |autograd - fd(0.005 Å)| ~ 2e-4 eV/Å² against entries up to ~4 eV/Å². CHGNet's forces
curve sharply on a ~0.01 Å scale, so its differences converge late: ~0.05 eV/Å² at 0.005 Å, ~0.01 at
0.00125 Å, ~0.005 at 0.0006 Å (then noise grows). The tests ask for agreement with margin at the
smallest displacement and for the difference to fall as the displacement shrinks (the limit of finite
differences is the autograd row).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from ase.build import bulk
from ase.neighborlist import neighbor_list

from mlff_distiller.teachers import label_structures, read_labelled
from mlff_distiller.teachers.autograd import autograd_rows_function
from mlff_distiller.teachers.calculators import CalculatorSpec, make_calculator
from mlff_distiller.teachers.hessian import choose_row_coords, finite_difference_hessian_rows, hessian_rows_function

# teacher: (coarse delta, fine delta, max |autograd - fd(fine)| in eV/Å²)
TEACHERS = {"chgnet": (0.005, 0.00125, 0.03), "sevenn": (0.01, 0.005, 1e-3)}
pytestmark = pytest.mark.filterwarnings("ignore")


def _needs(name: str):
    return pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} is not installed")


@pytest.fixture(scope="module", params=[pytest.param(n, marks=_needs(n)) for n in TEACHERS])
def teacher(request):
    import torch

    torch.set_num_threads(1)
    return request.param, make_calculator(request.param)


def cell():
    """Rattled 32-atom Cu cell with no pair within 0.1 Å of the 5 Å cutoffs: finite differences must not
    straddle a change of the neighbour list (autograd never sees one; near a cutoff the two differ)."""
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    assert np.abs(neighbor_list("d", atoms, 5.5) - 5.0).min() > 0.1
    return atoms


def test_autograd_rows_are_the_limit_of_finite_differences(teacher):
    name, calculator = teacher
    coarse, fine, tolerance = TEACHERS[name]
    atoms, coords = cell(), [5, 77]
    kind, rows_of = hessian_rows_function(calculator, "auto")
    assert kind == "autograd" and autograd_rows_function(calculator) is not None
    exact = rows_of(atoms, coords)
    assert exact.shape == (2, 96) and np.abs(exact).max() > 2.0  # eV/Å²: a stiff enough test
    fd = [finite_difference_hessian_rows(atoms, calculator, coords, delta) for delta in (coarse, fine)]
    errors = [np.abs(rows - exact).max() for rows in fd]
    assert errors[1] < tolerance and errors[1] < 0.5 * errors[0], errors
    np.testing.assert_allclose(exact[:, coords], exact[:, coords].T, atol=1e-4)  # a symmetric block
    np.testing.assert_allclose(exact.reshape(2, -1, 3).sum(axis=1), 0.0, atol=1e-3)  # translation invariance
    assert hessian_rows_function(calculator, "fd")[0] == "fd"


def test_labelling_with_autograd_rows_and_site_energies(teacher, tmp_path):
    name, calculator = teacher
    atoms = cell()
    path = label_structures(
        [atoms], calculator, tmp_path / "one.extxyz", hessian_rows=2, site_energies=True, progress=False
    )
    (frame,) = read_labelled(path)
    assert frame.info["hessian_method"] == "autograd"
    assert frame.info["teacher_calls"] == 2  # the single point and the autograd pass
    coords = choose_row_coords(len(atoms), 2, 0, 0)
    np.testing.assert_array_equal(np.atleast_1d(frame.info["hessian_row_index"]), coords)
    expected = autograd_rows_function(calculator)(atoms, coords)
    stored = frame.arrays["hessian_rows"].reshape(len(atoms), 2, 3).transpose(1, 0, 2).reshape(2, -1)
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    site_energies = frame.arrays["site_energies"]
    assert site_energies.shape == (32,) and site_energies.sum() == pytest.approx(frame.get_potential_energy(), abs=1e-3)
    assert CalculatorSpec(name).teacher.site_energies and CalculatorSpec(name).teacher.autograd_hessian
