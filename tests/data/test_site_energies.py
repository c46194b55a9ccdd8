"""Site energies from teacher to loss: labelled by EMT, stored in the file, read, batched, output by the
students (summing exactly to their energies), matched by the loss term; errors for missing or
inconsistent labels."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from datakit import alloy_cell

from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import DataError, atoms_to_graph, read_labelled_structures
from mlff_distiller.data.statistics import compute_statistics
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.losses.hessian import EnergyForceHessianLoss
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers import build_distillation_dataset, label_structures
from mlff_distiller.teachers.calculators import CalculatorSpec, SiteEnergiesUnavailableError
from mlff_distiller.teachers.sampling import SamplingConfig

CUTOFF = 4.5


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Six 8-atom Cu-Au cells labelled by EMT with site energies."""
    structures = [alloy_cell(seed, repeat=(2, 1, 1), gold_fraction=0.25 + 0.125 * (seed % 3)) for seed in range(6)]
    path = tmp_path_factory.mktemp("sites") / "sites.extxyz"
    label_structures(structures, EMT(), path, progress=False, site_energies=True)
    return structures, path


def _batch(path, dtype=torch.float64):
    frames = read_labelled_structures(path)
    return frames, collate_atoms([atoms_to_graph(atoms, CUTOFF, dtype=dtype) for atoms in frames])


def test_site_energies_round_trip_from_teacher_to_batch(labelled):
    structures, path = labelled
    frames, batch = _batch(path)
    for atoms, frame in zip(structures, frames):
        reference = atoms.copy()
        reference.calc = EMT()
        np.testing.assert_allclose(frame.arrays["_site_energies"], reference.get_potential_energies(), atol=1e-7)
        assert frame.arrays["_site_energies"].sum() == pytest.approx(frame.info["_energy"], abs=1e-6)
        assert frame.info["teacher_calls"] == 1  # energy, forces, stress and site energies: one EMT evaluation
    assert batch[keys.SITE_ENERGIES].shape == (sum(len(a) for a in structures),)
    per_structure = torch.zeros(len(frames), dtype=torch.float64).index_add(
        0, batch[keys.BATCH], batch[keys.SITE_ENERGIES]
    )
    torch.testing.assert_close(per_structure, batch[keys.ENERGY], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_class", [SchNet, PaiNN])
def test_students_site_energies_sum_exactly_to_their_energy_and_feed_the_loss(labelled, model_class):
    _, path = labelled
    frames, batch = _batch(path)
    statistics = compute_statistics([atoms_to_graph(a, CUTOFF) for a in frames])
    model = model_class(cutoff=CUTOFF, hidden=8, interactions=1, num_rbf=6, statistics=statistics).double()
    out = model(batch)
    sums = torch.zeros_like(out[keys.ENERGY]).index_add(0, batch[keys.BATCH], out[keys.SITE_ENERGIES])
    assert torch.equal(sums, out[keys.ENERGY])  # the energy is this very sum

    plain, weighted = EnergyForceLoss(), EnergyForceLoss(site_energy_weight=2.5)
    base, terms = plain.terms(out, batch), weighted.terms(out, batch)
    error = out[keys.SITE_ENERGIES] - batch[keys.SITE_ENERGIES]
    torch.testing.assert_close(terms["loss"], base["loss"] + 2.5 * error.pow(2).mean())
    for reported in (base, terms):  # the metric is there whenever the labels are, meV/atom
        total, count = reported["site_energy_mae"]  # an exact (total, count) metric
        torch.testing.assert_close(total / count, 1e3 * error.abs().mean())
    hessian_loss = EnergyForceHessianLoss(site_energy_weight=2.5)
    torch.testing.assert_close(hessian_loss.terms(out, batch)["loss"], terms["loss"])


def test_site_energy_loss_falls_while_training_a_tiny_student(labelled):
    _, path = labelled
    frames, batch = _batch(path, torch.float32)
    torch.manual_seed(0)
    statistics = compute_statistics([atoms_to_graph(a, CUTOFF) for a in frames])
    model = SchNet(cutoff=CUTOFF, hidden=16, interactions=2, num_rbf=8, statistics=statistics).train()
    loss_fn = EnergyForceLoss(energy_weight=1.0, force_weight=1.0, site_energy_weight=10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    maes = []
    for _ in range(25):
        optimizer.zero_grad()
        terms = loss_fn(model, batch)
        terms["loss"].backward()
        optimizer.step()
        maes.append(float(terms["site_energy_mae"].total / terms["site_energy_mae"].count))
    final_terms = loss_fn(model.eval(), batch)["site_energy_mae"]
    final = float(final_terms.total / final_terms.count)
    assert final < 0.5 * maes[0], maes + [final]


def test_a_site_energy_term_without_labels_is_an_error(labelled):
    _, path = labelled
    frames, batch = _batch(path)
    unlabelled = collate_atoms(
        [{k: v for k, v in atoms_to_graph(a, CUTOFF).items() if k != keys.SITE_ENERGIES} for a in frames]
    )
    model = SchNet(cutoff=CUTOFF, hidden=8, interactions=1, num_rbf=6).double()
    with pytest.raises(ValueError, match=r"site_energy_weight=1.0 but the data has no site energies.*site_energies"):
        EnergyForceLoss(site_energy_weight=1.0)(model, unlabelled)
    assert "site_energy_mae" not in EnergyForceLoss()(model, unlabelled)  # weight 0: no term, no metric
    with pytest.raises(ValueError, match="site_energy_weight=-1"):
        EnergyForceLoss(site_energy_weight=-1.0)


def test_inconsistent_site_energies_in_a_file_are_refused(labelled, tmp_path):
    _, path = labelled
    frames = ase.io.read(path, ":")
    shifted = [atoms.copy() for atoms in frames]
    for atoms, frame in zip(shifted, frames):
        atoms.calc = frame.calc
    shifted[2].arrays["site_energies"] = shifted[2].arrays["site_energies"] + 0.01
    ase.io.write(tmp_path / "shifted.extxyz", shifted)
    with pytest.raises(DataError, match=r"structure 2 of .*sum to .* but the energy is"):
        read_labelled_structures(tmp_path / "shifted.extxyz")
    del shifted[2].arrays["site_energies"]
    ase.io.write(tmp_path / "partial.extxyz", shifted)
    with pytest.raises(DataError, match=r"5 of the 6 structures .* carry site energies .* but structure 2 does not"):
        read_labelled_structures(tmp_path / "partial.extxyz")


class NoSiteEnergies(Calculator):
    """EMT's energy and forces through a calculator that does not offer per-atom energies."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        emt = EMT()
        self.results = {"energy": emt.get_potential_energy(self.atoms), "forces": emt.get_forces(self.atoms)}


def test_a_teacher_without_site_energies_is_refused_before_any_work(tmp_path):
    structures = [alloy_cell(0)]
    with pytest.raises(SiteEnergiesUnavailableError, match=r"NoSiteEnergies does not provide per-atom .*emt, chgnet"):
        label_structures(structures, NoSiteEnergies(), tmp_path / "a.extxyz", site_energies=True, progress=False)
    assert not (tmp_path / "a.extxyz").exists()
    with pytest.raises(SiteEnergiesUnavailableError, match="teacher 'mace_mp' does not provide"):
        label_structures(structures, CalculatorSpec("mace_mp"), tmp_path / "b.extxyz", site_energies=True)
    with pytest.raises(SiteEnergiesUnavailableError, match="teacher 'mace_mp'"):  # before sampling anything
        config = SamplingConfig(
            system="Cu", teacher="mace_mp", cache_dir=str(tmp_path), site_energies=True, progress=False
        )
        build_distillation_dataset(config)
    assert list(tmp_path.iterdir()) == []
