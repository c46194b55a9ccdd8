"""Weighted energy + force loss, with the error metrics users compare (meV/atom, meV/Å)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data import keys

KINDS = ("mse", "huber")


class EnergyForceLoss:
    """``energy_weight * L(E) + force_weight * L(F) [+ stress_weight * L(W)]`` with L = MSE or Huber.

    The stress term (``stress_weight > 0``; the model must be built with ``compute_stress=True``)
    compares the virial per atom, stress x volume / atoms (eV/atom), so its scale matches the
    per-atom energy; batches without stress labels skip it.

    The site-energy term (``site_energy_weight > 0``) compares the student's per-atom energies (the terms
    its energy is the sum of) with the teacher's, atom by atom (eV); the data must carry them
    (``data.source.site_energies=true``). A decomposition of the energy into atoms is not unique: it is
    each model's gauge. What the term matches is the teacher's particular one, and that is meaningful
    because (1) the per-element offsets are pinned: both sides sum to the (matched) total energies, so a
    constant shift per element is ruled out wherever the per-element least-squares reference energies are
    unique (compositions that vary across the set; the student's reference energies are only its starting
    point, and its network learns the rest of the offset); (2) what remains, how energy is shared between
    neighbours, is a smooth local function for both models (sums of per-atom terms of a finite
    environment), so the teacher's split is learnable and gives n labels per structure instead of one.
    It does not make the student's energies more correct than the teacher's; it makes its atoms like the
    teacher's atoms. ``site_energy_mae`` (meV/atom) is reported whenever the labels are present.

    With ``per_atom_energy`` the energy term compares energies divided by the number of atoms, so
    structures of different sizes weigh alike. Reported terms (besides ``loss``):
    ``energy_mae_per_atom``, ``energy_rmse_per_atom`` (meV/atom), ``force_mae``, ``force_rmse``
    (meV/Å, over force components). RMSEs are of the batch; the Trainer averages them per structure.
    """

    def __init__(
        self,
        energy_weight: float = 1.0,
        force_weight: float = 10.0,
        per_atom_energy: bool = True,
        kind: str = "mse",
        huber_delta: float = 0.01,
        stress_weight: float = 0.0,
        site_energy_weight: float = 0.0,
    ) -> None:
        if energy_weight < 0 or force_weight < 0 or energy_weight + force_weight == 0:
            raise ValueError(
                f"energy_weight={energy_weight} and force_weight={force_weight} must be >= 0 and not both 0."
            )
        if stress_weight < 0:
            raise ValueError(f"stress_weight={stress_weight} must be >= 0.")
        if site_energy_weight < 0:
            raise ValueError(f"site_energy_weight={site_energy_weight} must be >= 0.")
        if kind not in KINDS:
            raise ValueError(f"loss kind={kind!r} is invalid; accepted: {', '.join(KINDS)}.")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta={huber_delta} must be > 0.")
        self.energy_weight = energy_weight
        self.force_weight = force_weight
        self.per_atom_energy = per_atom_energy
        self.kind = kind
        self.huber_delta = huber_delta
        self.stress_weight = stress_weight
        self.site_energy_weight = site_energy_weight

    def _term(self, error: torch.Tensor) -> torch.Tensor:
        if self.kind == "huber":
            return F.huber_loss(error, torch.zeros_like(error), delta=self.huber_delta)
        return error.pow(2).mean()

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.terms(model(batch), batch)

    def terms(
        self, predicted: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The loss and metrics of the model's output ``predicted`` against the labels in ``batch``."""
        atoms = _atoms_per_structure(batch)
        energy_error = (predicted[keys.ENERGY] - batch[keys.ENERGY]) / atoms
        force_error = predicted[keys.FORCES] - batch[keys.FORCES]
        energy_for_loss = energy_error if self.per_atom_energy else energy_error * atoms
        loss = self.energy_weight * self._term(energy_for_loss) + self.force_weight * self._term(force_error)
        extra: dict[str, torch.Tensor] = {}
        if self.stress_weight > 0 and keys.STRESS in batch:
            if keys.STRESS not in predicted:
                raise ValueError(
                    "loss.stress_weight > 0 needs a model that outputs stress: build it with compute_stress=True "
                    "(model.compute_stress=true on the command line)."
                )
            stress_error = predicted[keys.STRESS] - batch[keys.STRESS]
            volume_per_atom = torch.linalg.det(batch[keys.CELL]).abs() / atoms
            loss = loss + self.stress_weight * self._term(stress_error * volume_per_atom[:, None, None])
            extra["stress_mae"] = 1e3 * stress_error.detach().abs().mean()
        if self.site_energy_weight > 0 or (keys.SITE_ENERGIES in batch and keys.SITE_ENERGIES in predicted):
            site_error = self._site_energy_error(predicted, batch)
            if self.site_energy_weight > 0:
                loss = loss + self.site_energy_weight * self._term(site_error)
            extra["site_energy_mae"] = 1e3 * site_error.detach().abs().mean()
        with torch.no_grad():
            return {
                **extra,
                "loss": loss,
                "energy_mae_per_atom": 1e3 * energy_error.abs().mean(),
                "energy_rmse_per_atom": 1e3 * energy_error.pow(2).mean().sqrt(),
                "force_mae": 1e3 * force_error.abs().mean(),
                "force_rmse": 1e3 * force_error.pow(2).mean().sqrt(),
            }

    def _site_energy_error(
        self, predicted: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Student minus teacher site energies, eV; (atoms,). A requested term without labels is an error."""
        if keys.SITE_ENERGIES not in batch:
            raise ValueError(
                f"loss.site_energy_weight={self.site_energy_weight} but the data has no site energies. Label "
                "them with the teacher (data.source.site_energies=true; teachers with site energies: emt, "
                "chgnet, sevenn), or set loss.site_energy_weight=0."
            )
        if keys.SITE_ENERGIES not in predicted:
            raise ValueError(
                f"loss.site_energy_weight={self.site_energy_weight} needs a model that outputs "
                f"{keys.SITE_ENERGIES!r} (the atomistic students do)."
            )
        return predicted[keys.SITE_ENERGIES] - batch[keys.SITE_ENERGIES].to(predicted[keys.SITE_ENERGIES].dtype)


def _atoms_per_structure(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if keys.NUM_ATOMS in batch:
        return batch[keys.NUM_ATOMS].to(batch[keys.POSITIONS].dtype)
    positions = batch[keys.POSITIONS]  # fixed-size clusters: (structures, atoms, 3)
    return torch.full(positions.shape[:1], positions.shape[-2], dtype=positions.dtype, device=positions.device)
