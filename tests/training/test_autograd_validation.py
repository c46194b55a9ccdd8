"""Models that differentiate inside forward (forces = -dE/dx) train and validate correctly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainer_testkit import make_trainer


class EnergyModel(nn.Module):
    """E(x) = sum over particles of an MLP of each particle's position; forces = -dE/dx."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.inner = nn.Linear(3, hidden)
        self.outer = nn.Linear(hidden, 1)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.detach().requires_grad_(True)
        energy = self.outer(torch.tanh(self.inner(positions))).sum(dim=(1, 2))
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
        return energy, -grad


def analytic_forces(weights: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """-dE/dx written out by hand: -sum_k a_k (1 - tanh^2(w_k . x + b_k)) w_k."""
    w, b, a = weights["inner.weight"], weights["inner.bias"], weights["outer.weight"][0]
    h = torch.tanh(positions @ w.T + b)
    return -((1 - h**2) * a) @ w


class ForceLoss:
    """Force MSE is optimised (its gradient exists only through create_graph=True); the energy error is
    logged. Keeps the forces predicted in eval mode (validation) for inspection."""

    def __init__(self) -> None:
        self.val_forces: list[torch.Tensor] = []
        self.val_positions: list[torch.Tensor] = []

    def __call__(self, model, batch):
        positions, energy_ref, forces_ref = batch
        energy, forces = model(positions)
        if not model.training:
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            self.val_forces.append(forces.detach().clone())
            self.val_positions.append(positions.clone())
        energy_loss = (energy - energy_ref).pow(2).mean()
        force_loss = (forces - forces_ref).pow(2).mean()
        return {"loss": force_loss, "energy": energy_loss, "forces": force_loss}


def _dataset(n: int, seed: int) -> TensorDataset:
    """Positions drawn with ``seed``; energies and forces from one fixed 'teacher' model."""
    torch.manual_seed(100)
    teacher = EnergyModel(hidden=6).double()
    positions = torch.randn(n, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    energy, forces = teacher.eval()(positions)
    return TensorDataset(positions, energy.detach(), forces.detach())


@pytest.mark.parametrize("ema_decay", [None, 0.8])
def test_validation_with_autograd_forces_matches_analytic_gradient(ema_decay):
    """validate() runs a model that calls autograd.grad in forward; the forces it computes equal the
    analytic -dE/dx (float64, for the weights validation uses: EMA ones when EMA is on); parameters keep
    requires_grad=True afterwards and training with create_graph lowers the force error."""
    train = DataLoader(_dataset(32, seed=1), batch_size=8)
    val = DataLoader(_dataset(16, seed=2), batch_size=8)
    torch.manual_seed(3)
    model = EnergyModel().double()
    loss = ForceLoss()
    trainer = make_trainer(
        model, train, val, loss_fn=loss, optimizer="adam", learning_rate=0.02, max_epochs=4, ema_decay=ema_decay
    )
    initial = trainer.validate(val)["val/forces"]
    history = trainer.fit()

    assert all(p.requires_grad for p in model.parameters())
    assert model.training  # the train/eval mode is restored after validation
    assert history["val/forces"][-1] < 0.3 * initial  # learned through the double-backward path

    loss.val_forces.clear()
    loss.val_positions.clear()
    metrics = trainer.validate(val)
    weights = trainer.ema.averaged_state_dict(model) if ema_decay else dict(model.state_dict())
    assert len(loss.val_forces) == 2
    for positions, forces in zip(loss.val_positions, loss.val_forces):
        assert forces.dtype == torch.float64
        torch.testing.assert_close(forces, analytic_forces(weights, positions), rtol=1e-10, atol=1e-12)
    assert metrics["val/forces"] == pytest.approx(history["val/forces"][-1], rel=1e-6)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # validation built no grads


def test_forces_match_finite_differences():
    """The analytic reference itself agrees with central finite differences of the energy (float64)."""
    torch.manual_seed(0)
    model = EnergyModel().double().eval()
    positions = torch.randn(1, 3, 3, dtype=torch.float64)
    _, forces = model(positions)
    eps = 1e-6
    numeric = torch.zeros_like(positions)
    for idx in range(positions.numel()):
        delta = torch.zeros(positions.numel(), dtype=torch.float64)
        delta[idx] = eps
        delta = delta.view_as(positions)
        with torch.no_grad():
            e_plus = model.outer(torch.tanh(model.inner(positions + delta))).sum()
            e_minus = model.outer(torch.tanh(model.inner(positions - delta))).sum()
        numeric.view(-1)[idx] = -(e_plus - e_minus) / (2 * eps)
    torch.testing.assert_close(forces.detach(), numeric, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(forces.detach(), analytic_forces(dict(model.state_dict()), positions))


def test_requires_grad_and_mode_restored_when_validation_raises():
    """If the loss fails during validation, parameters get requires_grad back and train mode returns."""
    train = DataLoader(_dataset(8, seed=1), batch_size=8)
    torch.manual_seed(3)
    model = EnergyModel().double()
    frozen_bias = model.outer.bias
    frozen_bias.requires_grad_(False)  # a user-frozen parameter must stay frozen

    def failing_in_eval(model, batch):
        if not model.training:
            raise RuntimeError("boom")
        return ForceLoss()(model, batch)

    trainer = make_trainer(model, train, train, loss_fn=failing_in_eval, max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
