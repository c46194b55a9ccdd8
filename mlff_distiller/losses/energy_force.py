"""Weighted energy + force loss with MAE metrics."""

from __future__ import annotations

import torch
from torch import nn

from ..data import keys


class EnergyForceLoss:
    """``energy_weight * MSE(E) + force_weight * MSE(F)``; also reports MAEs (eV, eV/Å)."""

    def __init__(self, energy_weight: float = 1.0, force_weight: float = 10.0) -> None:
        if energy_weight < 0 or force_weight < 0 or energy_weight + force_weight == 0:
            raise ValueError(
                f"energy_weight={energy_weight} and force_weight={force_weight} must be >= 0 and not both 0."
            )
        self.energy_weight = energy_weight
        self.force_weight = force_weight

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        predicted = model(batch)
        energy_error = predicted[keys.ENERGY].float() - batch[keys.ENERGY]
        force_error = predicted[keys.FORCES].float() - batch[keys.FORCES]
        energy_mse = energy_error.pow(2).mean()
        force_mse = force_error.pow(2).mean()
        return {
            "loss": self.energy_weight * energy_mse + self.force_weight * force_mse,
            "energy_mse": energy_mse,
            "force_mse": force_mse,
            "energy_mae": energy_error.abs().mean(),
            "force_mae": force_error.abs().mean(),
        }
