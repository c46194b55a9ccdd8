"""`evaluate_structures`: the Trainer's exact metrics without a Trainer, predictions next to labels, parity data
(a superset of the distillation report's accuracy figures), and a refusal of elements the student never saw."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from evalkit import CUTOFF, mixed_structures, write_mixed

from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import atoms_to_graph, hessian_rows_of
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.evaluation import evaluate_structures
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.base import UnknownElementError
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.plots import parity_plot
from mlff_distiller.teachers.hessian import label_hessian_rows
from mlff_distiller.training import Trainer, TrainingConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evaluation")
    return AtomsDataModule(
        path=str(write_mixed(directory / "train.extxyz", 8, seed=1)),
        test_path=str(write_mixed(directory / "test.extxyz", 9, seed=3)),
        cutoff=CUTOFF,
        num_val=1,
        val_batch_size=4,
    )


def student(data: AtomsDataModule, compute_stress: bool = False) -> SchNet:
    torch.manual_seed(0)
    return SchNet(cutoff=CUTOFF, hidden=16, interactions=1, statistics=data.statistics, compute_stress=compute_stress)


def test_metrics_equal_the_trainers_whatever_the_batch_size(data):
    model = student(data)
    config = TrainingConfig(max_epochs=1, checkpoint_dir=None, device="cpu", log_interval=1000)
    loss = EnergyForceLoss(metric_groups=data.metric_groups)
    trainer = Trainer(model, data.train_loader(), data.val_loader(), config=config, loss_fn=loss, loggers=[])
    from_trainer = {k.removeprefix("test/"): v for k, v in trainer.evaluate(data.test_loader(), "test").items()}
    one, five = (evaluate_structures(model, data.structures("test"), batch_size=b).metrics for b in (1, 5))
    assert {"force_mae/Au", "force_mae/config_type=cluster85", "energy_mae_per_atom/config_type=bulk"} <= set(one)
    for name, value in one.items():
        assert five[name] == pytest.approx(value, rel=1e-6), name
        if name in from_trainer:
            assert value == pytest.approx(from_trainer[name], rel=1e-6), name
    assert set(from_trainer) - set(one) == {"loss"}
    assert one["num_structures"] == 9 and one["num_atoms"] == sum(len(a) for a in data.structures("test"))


def test_predictions_sit_next_to_the_labels_and_read_back(data, tmp_path):
    """All-periodic structures: stress is compared too, and predicted / labelled values are written as extxyz."""
    cells = [atoms for atoms in mixed_structures(8, seed=5) if atoms.pbc.all()]
    model = student(data)
    result = evaluate_structures(model, cells, batch_size=2)
    assert result.metrics["stress_mae"] > 0
    path = result.write_predictions(tmp_path / "predictions.extxyz")
    back = ase.io.read(path, ":")
    assert len(back) == len(cells) == 2
    stress_errors = []
    for original, written in zip(cells, back):
        assert written.info["label_energy"] == pytest.approx(original.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(written.arrays["label_forces"], original.get_forces(), atol=1e-7)  # %.8f
        alone = model.eval()(collate_atoms([atoms_to_graph(original, CUTOFF, with_labels=False)]))
        assert written.info["predicted_energy"] == pytest.approx(float(alone[keys.ENERGY].detach()), rel=1e-5)
        np.testing.assert_allclose(written.arrays["predicted_forces"], alone[keys.FORCES].detach(), atol=1e-5)
        np.testing.assert_allclose(written.info["label_stress"], original.get_stress(), rtol=1e-6, atol=1e-9)
        stress_errors.append(written.info["predicted_stress"] - written.info["label_stress"])
        assert written.info["config_type"] == "bulk" and written.calc is None
    # stress_mae is over all 9 components of each 3x3 stress (Voigt: 3 diagonal + 3 doubled off-diagonal)
    voigt = np.abs(np.array(stress_errors))
    expected = 1e3 * (voigt[:, :3].sum() + 2 * voigt[:, 3:].sum()) / (9 * len(cells))
    assert result.metrics["stress_mae"] == pytest.approx(expected, rel=1e-4)
    png = parity_plot(result.parity, tmp_path / "parity.png", "cells")
    assert png is not None and png.stat().st_size > 10_000
    assert {
        f"{q}_{side}" for q in ("energy_per_atom", "forces", "stress") for side in ("reference", "predicted")
    } == set(result.parity)


def student_hessian_row(model, atoms, coordinate: int) -> np.ndarray:
    """Row ``coordinate`` of the student's energy Hessian by double backward through one structure alone."""
    graph = atoms_to_graph(atoms, CUTOFF, with_labels=False)
    batch = collate_atoms([graph])
    positions = batch[keys.POSITIONS].detach().requires_grad_(True)
    forces = model(batch.replace(**{keys.POSITIONS: positions}))[keys.FORCES]
    (row,) = torch.autograd.grad(-forces.reshape(-1)[coordinate], positions)
    return row.reshape(-1).double().numpy()


def test_hessian_rows_and_the_force_scale_the_distillation_report_uses(data):
    """Hessian-row MAE against rows computed one structure at a time; force_std and force_mae_rel (the
    distillation report's accuracy figures) from the parity data."""
    structures = []
    for index, atoms in enumerate(mixed_structures(4, seed=7)[:2] + mixed_structures(4, seed=8)[3:]):
        label_hessian_rows(atoms, EMT(), rows=2, seed=0, index=index)
        structures.append(atoms)
    model = student(data).eval()
    ours = evaluate_structures(model, structures, batch_size=2)
    errors = []
    for atoms in structures:
        coords, rows = hessian_rows_of(atoms)
        for coordinate, row in zip(coords, rows):
            errors.append(student_hessian_row(model, atoms, int(coordinate)) - row)
    assert len(ours.parity["hessian_reference"]) == 2 * 3 * (19 + 44 + 32) == np.concatenate(errors).size
    assert ours.metrics["hessian_mae"] == pytest.approx(1e3 * np.abs(np.concatenate(errors)).mean(), rel=1e-4)
    reference = ours.parity["forces_reference"]
    assert ours.metrics["force_std"] == pytest.approx(1e3 * reference.std(), rel=1e-9)
    mae = 1e3 * np.abs(ours.parity["forces_predicted"] - reference).mean()
    assert ours.metrics["force_mae_rel"] == pytest.approx(mae / ours.metrics["force_std"], rel=1e-6)


def test_labels_from_a_live_calculator(data):
    """Structures carrying a calculator that has not run yet (a teacher) are labelled by it."""
    structures = mixed_structures(2, seed=9)
    fresh = []
    for atoms in structures:
        copy = atoms.copy()
        copy.calc = EMT()
        fresh.append(copy)
    model = student(data)
    assert evaluate_structures(model, fresh).metrics == evaluate_structures(model, structures).metrics


def test_unknown_elements_are_refused_before_any_work(data):
    model = student(data)
    silver = bulk("Ag", "fcc", a=4.09, cubic=True)
    silver.calc = EMT()
    silver.get_potential_energy()
    structures = mixed_structures(3, seed=4) + [silver]
    with pytest.raises(UnknownElementError) as info:
        evaluate_structures(model, structures, source="'mine.extxyz'")
    message = str(info.value)
    assert "'mine.extxyz' (structure 3 of 4) contains Ag" in message and "Cu, Au" in message
