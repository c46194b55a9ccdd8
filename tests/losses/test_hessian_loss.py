"""Hessian distillation loss: the student's VJP rows against its own finite differences (float64), the
choice of rows, the switch-on step, gradients reaching the weights, and the metric in eval mode."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import atoms_to_graph
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.losses.hessian import EnergyForceHessianLoss, row_slots, student_hessian_entries
from mlff_distiller.models.schnet import SchNet

CUTOFF = 4.0


def _structures():
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))  # 8 atoms, periodic
    cell.rattle(0.1, seed=0)
    water = molecule("H2O")  # 3 atoms, not periodic
    water.rattle(0.05, seed=1)
    return [cell, water]


def _batch(row_coords: list[list[int]], seed: int = 0, energy: float = 0.0):
    """The two structures with labels (zeros/random) and the given rows of random values."""
    rng = np.random.default_rng(seed)
    items = []
    for atoms, coords in zip(_structures(), row_coords):
        item = atoms_to_graph(atoms, CUTOFF, with_labels=False, dtype=torch.float64)
        item[keys.ENERGY] = torch.tensor(energy, dtype=torch.float64)
        item[keys.FORCES] = torch.zeros(len(atoms), 3, dtype=torch.float64)
        if coords:
            item[keys.HESSIAN_ROW_COORD] = torch.tensor(coords)
            item[keys.HESSIAN_ROWS] = torch.tensor(rng.normal(size=(len(coords), 3 * len(atoms))))
        items.append(item)
    return collate_atoms(items)


def _model():
    torch.manual_seed(0)
    return SchNet(cutoff=CUTOFF, hidden=16, interactions=2, num_rbf=8).double()


def _finite_difference_row(model, batch, coord: int, delta: float = 1e-5) -> torch.Tensor:
    """-(F(x + h e_c) - F(x - h e_c)) / 2h over the batch's flattened coordinates (same neighbour list)."""
    forces = []
    for sign in (1.0, -1.0):
        positions = batch[keys.POSITIONS].clone().reshape(-1)
        positions[coord] += sign * delta
        forces.append(model(batch.replace(**{keys.POSITIONS: positions.reshape(-1, 3)}))[keys.FORCES].detach())
    return -(forces[0] - forces[1]).reshape(-1) / (2 * delta)


@pytest.mark.parametrize("training", [True, False])
def test_vjp_rows_equal_finite_difference_rows(training):
    model = _model().train(training)
    batch = _batch([[2, 17, 23], [0, 8]])  # three rows of the cell, two of the water molecule
    positions = batch[keys.POSITIONS].detach().requires_grad_(True)
    forces = model(batch.replace(**{keys.POSITIONS: positions}))[keys.FORCES]
    slots = torch.tensor([0, 1, 2, 0, 1])  # one row per structure and slot
    entries = student_hessian_entries(forces, positions, batch, slots, 3, create_graph=training)
    assert entries.requires_grad == training
    errors = []
    for row, coord in enumerate(batch[keys.HESSIAN_ROW_COORD].tolist()):
        mask = batch[keys.HESSIAN_ENTRY_ROW] == row
        reference = _finite_difference_row(model, batch, coord)
        own = batch[keys.HESSIAN_ENTRY_COORD][mask]
        errors.append((entries[mask].detach() - reference[own]).abs().max())
        outside = torch.ones_like(reference, dtype=torch.bool)
        outside[own] = False
        assert reference[outside].abs().max() == 0  # block-diagonal: no coupling between structures
        assert reference[own].abs().max() > 0.1
    assert max(errors) < 1e-8, errors  # float64, central differences with h = 1e-5 Å (measured: 8e-11)


def test_row_slots_pick_distinct_rows_per_structure():
    row_structure = torch.tensor([0, 0, 0, 0, 2, 3, 3])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        slots = row_slots(row_structure, 2, generator)
        for structure, expected in ((0, 2), (2, 1), (3, 2)):
            mine = slots[row_structure == structure]
            assert sorted(mine[mine >= 0].tolist()) == list(range(expected))
        seen.add(tuple(slots[:4].tolist()))
    assert len(seen) > 3  # random choice among the 4 rows of structure 0
    assert row_slots(row_structure, 3, None).tolist() == [0, 1, 2, -1, 0, 0, 1]


def test_hessian_term_is_off_before_start_step_and_on_after():
    model = _model().train()
    batch = _batch([[2, 17], [4]], energy=-10.0)
    baseline = EnergyForceLoss(energy_weight=1.0, force_weight=10.0)(model, batch)["loss"]
    loss = EnergyForceHessianLoss(energy_weight=1.0, force_weight=10.0, hessian_weight=0.5, hessian_start_step=3)
    loss.step = 2
    before = loss(model, batch)
    assert "hessian_mae" not in before and not loss.hessian_active
    torch.testing.assert_close(before["loss"], baseline)
    loss.step = 3
    after = loss(model, batch)
    assert loss.hessian_active and after["hessian_mae"].total > 0 and after["hessian_mae"].count > 0
    torch.testing.assert_close(after["loss"], baseline + 0.5 * after["hessian_loss"])
    model.zero_grad()
    after["loss"].backward()
    with_term = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    baseline.backward()
    difference = max((a - p.grad).abs().max() for a, p in zip(with_term, model.parameters()))
    assert difference > 1e-6  # the Hessian term reaches the weights (third derivative)


def test_eval_mode_reports_mae_over_all_rows_with_frozen_parameters():
    model = _model().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    batch = _batch([[2, 17, 23], [0, 8]])
    out = EnergyForceHessianLoss(hessian_start_step=10**6)(model, batch)  # the step does not matter in eval
    positions = batch[keys.POSITIONS].detach().requires_grad_(True)
    forces = model(batch.replace(**{keys.POSITIONS: positions}))[keys.FORCES]
    entries = student_hessian_entries(forces, positions, batch, torch.tensor([0, 1, 2, 0, 1]), 3, False)
    errors = (entries - batch[keys.HESSIAN_ROWS]).double().abs()
    # Exact (total, count): summed over batches and divided once by the Trainer.
    torch.testing.assert_close(out["hessian_mae"].total, 1e3 * errors.sum())
    assert int(out["hessian_mae"].count) == errors.numel()
    assert "hessian_loss" not in out


def test_batches_without_rows_and_bad_options():
    model = _model().train()
    batch = _batch([[], []])
    out = EnergyForceHessianLoss()(model, batch)
    assert "hessian_mae" not in out
    with pytest.raises(ValueError, match="hessian_rows=0"):
        EnergyForceHessianLoss(hessian_rows=0)
    with pytest.raises(ValueError, match="hessian_weight=-1"):
        EnergyForceHessianLoss(hessian_weight=-1)


def test_through_the_trainer_the_term_follows_global_step_and_its_draws_are_checkpointed(tmp_path):
    """Given to the Trainer as loss_fn (its callback hooks are called), the term switches on at optimizer step
    hessian_start_step; the row-draw counter is saved with the checkpoint and restored on resume."""
    from mlff_distiller.training import Callback, Trainer, TrainingConfig

    batches = [_batch([[2, 17], [4]], seed=0), _batch([[3], [0, 8]], seed=1)] * 2  # 4 steps per epoch
    seen: list[bool] = []

    class Terms(Callback):
        def on_train_batch_end(self, trainer, batch_index, terms):
            seen.append("hessian_loss" in terms)

    def trainer(loss, max_epochs):
        config = TrainingConfig(
            max_epochs=max_epochs, learning_rate=1e-3, checkpoint_dir=str(tmp_path), device="cpu", batch_size=2
        )
        return Trainer(_model(), batches, config=config, loss_fn=loss, callbacks=[Terms()], loggers=[])

    loss = EnergyForceHessianLoss(energy_weight=1.0, force_weight=10.0, hessian_start_step=2)
    trainer(loss, max_epochs=1).fit()
    assert seen == [False, False, True, True]  # steps 0, 1 without the term; from step 2 on with it
    assert torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]["loss_fn"] == {"calls": 2}

    resumed_loss = EnergyForceHessianLoss(energy_weight=1.0, force_weight=10.0, hessian_start_step=2)
    resumed = trainer(resumed_loss, max_epochs=2)
    resumed.load_checkpoint(tmp_path / "last.pt")
    assert (resumed_loss.calls, resumed.global_step) == (2, 4)
    resumed.fit()
    assert resumed_loss.step == 8 and resumed_loss.calls == 6 and seen[4:] == [True] * 4


def test_losses_import_nothing_of_the_trainer():
    """Losses know nothing of training: no module of mlff_distiller.losses imports mlff_distiller.training, except
    the exact-metric term types (training.metrics: Mean, RootMean), which are what a loss returns to any loop."""
    package = Path(__file__).resolve().parents[2] / "mlff_distiller" / "losses"
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    allowed = {"..training.metrics", "mlff_distiller.training.metrics"}
    assert imported and not [name for name in imported if "training" in name and name not in allowed], sorted(imported)
