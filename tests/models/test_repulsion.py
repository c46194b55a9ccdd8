"""The ZBL repulsion prior (``model.zbl``): the screened Coulomb energy of a pair, zero beyond the covalent
reach, smooth there, exact forces through the students, and the same numbers traced, compiled and exported."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.data import covalent_radii
from atoms_testkit import energy_function, make_batch, predict, small_model

from mlff_distiller.data import keys
from mlff_distiller.models.repulsion import ZBLRepulsion


def zbl_pair(z1: int, z2: int, r: float, reach: float) -> float:
    """ZBL written out for one pair, as the literature states it (independent of the module's vectorised form)."""
    a = 0.46850 / (z1**0.23 + z2**0.23)
    x = r / a
    phi = (
        0.18175 * math.exp(-3.19980 * x)
        + 0.50986 * math.exp(-0.94229 * x)
        + 0.28022 * math.exp(-0.40290 * x)
        + 0.02817 * math.exp(-0.20162 * x)
    )
    u = r / reach
    envelope = 1 - 28 * u**6 + 48 * u**7 - 21 * u**8 if u < 1 else 0.0
    return 14.399645 * z1 * z2 / r * phi * envelope


def dimer_energy(module: ZBLRepulsion, z1: int, z2: int, r: float) -> torch.Tensor:
    numbers = torch.tensor([z1, z2])
    edge_index = torch.tensor([[0, 1], [1, 0]])  # a full list: the pair in both directions
    return module(numbers, edge_index, torch.tensor([r, r], dtype=torch.float64)).sum()


@pytest.mark.parametrize(("z1", "z2"), [(1, 1), (8, 1), (29, 79)])
def test_a_pair_gets_the_zbl_energy_inside_its_covalent_reach_and_none_beyond(z1, z2):
    module = ZBLRepulsion().double()
    reach = covalent_radii[z1] + covalent_radii[z2]
    for fraction in (0.3, 0.6, 0.9):
        r = fraction * reach
        got = float(dimer_energy(module, z1, z2, r))
        assert got == pytest.approx(zbl_pair(z1, z2, r, reach), rel=1e-10)
        assert got > 0
    for r in (reach, 1.2 * reach, 5.0):
        assert float(dimer_energy(module, z1, z2, r)) == 0.0
    # Very close, the screening vanishes and the bare nuclear Coulomb repulsion remains.
    r = 1e-4
    assert float(dimer_energy(module, z1, z2, r)) == pytest.approx(14.399645 * z1 * z2 / r, rel=0.01)


def test_the_repulsion_rises_monotonically_and_switches_off_smoothly():
    module = ZBLRepulsion().double()
    reach = 2 * covalent_radii[1]
    r = torch.linspace(0.2, 1.2 * reach, 400, dtype=torch.float64, requires_grad=True)
    numbers = torch.ones(2 * len(r), dtype=torch.long)
    pairs = torch.arange(len(r))
    edge_index = torch.stack([torch.cat([2 * pairs, 2 * pairs + 1]), torch.cat([2 * pairs + 1, 2 * pairs])])
    energy = module(numbers, edge_index, torch.cat([r, r])).view(-1, 2).sum(1)
    (force,) = torch.autograd.grad(-energy.sum(), r, create_graph=True)
    (curvature,) = torch.autograd.grad(-force.sum(), r)
    inside = r.detach() < reach
    assert bool((force[inside][:-1] > 0).all())  # pushes the atoms apart everywhere inside the reach
    assert bool((energy[inside].diff() < 0).all())
    assert bool((energy[~inside] == 0).all()) and bool((force[~inside] == 0).all())
    # Energy, force and curvature all vanish at the reach (no kick in MD when a pair crosses it): the energy
    # as the cube of the distance to the reach, the force as its square, the curvature linearly.
    values = {}
    for h in (1e-3, 2e-3):
        x = torch.tensor([reach - h], dtype=torch.float64, requires_grad=True)
        e = module(torch.ones(2, dtype=torch.long), torch.tensor([[0, 1], [1, 0]]), torch.cat([x, x])).sum()
        (f,) = torch.autograd.grad(-e, x, create_graph=True)
        (k,) = torch.autograd.grad(-f.sum(), x)
        values[h] = (e.item(), f.item(), k.item())
    for power, (small, large) in zip((3, 2, 1), zip(values[1e-3], values[2e-3])):
        assert small / large == pytest.approx(0.5**power, rel=0.02)


def squeezed_water() -> Atoms:
    """Two water molecules, a hydrogen of one pushed to 0.6 Å of the other's oxygen (inside the O-H reach)."""
    atoms = Atoms(
        "OH2OH2",
        positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [1.56, 0.1, 0.05], [2.1, 0.8, 0.3], [2.0, -0.7, -0.2]],
    )
    atoms.rattle(0.02, seed=3)
    return atoms


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_a_student_with_the_prior_adds_exactly_the_zbl_energy_and_its_forces_are_minus_the_gradient(name):
    torch.manual_seed(0)
    plain = small_model(name).eval()
    with_prior = small_model(name, zbl=True).eval()
    with_prior.load_state_dict(plain.state_dict(), strict=False)  # the same network; the prior's buffers stay
    batch = make_batch([squeezed_water()])
    energy, forces = predict(with_prior, batch)
    energy_plain, _ = predict(plain, batch)
    atoms = squeezed_water()
    d = atoms.get_all_distances()
    reach = covalent_radii[atoms.numbers][:, None] + covalent_radii[atoms.numbers][None, :]
    expected = sum(
        zbl_pair(int(atoms.numbers[i]), int(atoms.numbers[j]), d[i, j], reach[i, j])
        for i in range(len(atoms))
        for j in range(i + 1, len(atoms))
    )
    assert expected > 1.0  # the squeezed pair is well inside the reach: the check below is not about zeros
    assert float(energy - energy_plain) == pytest.approx(expected, rel=1e-9)
    site = with_prior(batch)[keys.SITE_ENERGIES]
    assert float(site.sum()) == pytest.approx(float(energy), rel=1e-12)

    energy_of = energy_function(with_prior, batch)
    positions = batch[keys.POSITIONS]
    rng = np.random.default_rng(2)
    for _ in range(4):
        direction = torch.tensor(rng.normal(size=positions.shape))
        direction = direction / direction.norm()
        eps = 1e-6
        numeric = (energy_of(positions + eps * direction) - energy_of(positions - eps * direction)) / (2 * eps)
        assert numeric == pytest.approx(-float((forces * direction).sum()), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_the_prior_is_the_same_eager_traced_and_scripted(name):
    model = small_model(name, zbl=True).eval()
    batch = make_batch([squeezed_water()])
    energy, forces = predict(model, batch)
    traced = copy.deepcopy(model)
    traced.set_compile("fx")
    energy_traced, forces_traced = predict(traced, batch)
    assert traced.compiled.traces == 1
    scripted = torch.jit.script(copy.deepcopy(model))
    out = scripted({key: value for key, value in batch.items() if torch.is_tensor(value)})
    for e, f in ((energy_traced, forces_traced), (out[keys.ENERGY], out[keys.FORCES])):
        torch.testing.assert_close(e, energy, rtol=0, atol=1e-10)
        torch.testing.assert_close(f, forces, rtol=0, atol=1e-10)


def test_a_bad_reach_is_refused():
    with pytest.raises(ValueError, match="radius_factor"):
        ZBLRepulsion(radius_factor=0.0)
