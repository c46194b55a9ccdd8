"""Weighted energy + force loss, with the error metrics users compare (meV/atom, meV/Å).

The metrics are exact: each is a (total, count) pair (:class:`~mlff_distiller.training.metrics.Mean`) that
the Trainer adds up over the whole split and divides once, so an MAE is the mean over every force component
(or structure) of the split whatever the mix of structure sizes and batch sizes, and an RMSE is the square
root of the mean square. The loss that is optimised stays a batch mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import keys
from ..training.metrics import Mean, RootMean

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
    structures of different sizes weigh alike. Reported terms (besides ``loss``): the exact metrics of
    :func:`error_metrics`; in eval mode (validation, test) also per element and per metric group.

    ``metric_groups``: the names of the groups that the batch's ``metric_group`` indices point to (the data
    module's ``metric_groups``, e.g. ``["config_type=md_600K", "config_type=rattle"]``); None reports no
    per-group metrics.
    """

    def __init__(
        self,
        energy_weight: float = 1.0,
        force_weight: float = 10.0,
        per_atom_energy: bool = True,
        kind: str = "mse",
        huber_delta: float = 0.01,
        stress_weight: float = 0.0,
        metric_groups: Sequence[str] | None = None,
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
        self.metric_groups = list(metric_groups) if metric_groups is not None else None
        self.site_energy_weight = site_energy_weight

    def _term(self, error: torch.Tensor) -> torch.Tensor:
        if self.kind == "huber":
            return F.huber_loss(error, torch.zeros_like(error), delta=self.huber_delta)
        return error.pow(2).mean()

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | Mean]:
        return self.terms(model(batch), batch, detailed=not model.training)

    def terms(
        self, predicted: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], detailed: bool = False
    ) -> dict[str, torch.Tensor | Mean]:
        """The loss of the model's output ``predicted`` against the labels in ``batch``, and the metrics of
        :func:`error_metrics` (per element and per group with ``detailed``)."""
        atoms = _atoms_per_structure(batch)
        energy_error = (predicted[keys.ENERGY] - batch[keys.ENERGY]) / atoms
        force_error = predicted[keys.FORCES] - batch[keys.FORCES]
        energy_for_loss = energy_error if self.per_atom_energy else energy_error * atoms
        loss = self.energy_weight * self._term(energy_for_loss) + self.force_weight * self._term(force_error)
        if self.stress_weight > 0 and keys.STRESS in batch:
            if keys.STRESS not in predicted:
                raise ValueError(
                    "loss.stress_weight > 0 needs a model that outputs stress: build it with compute_stress=True "
                    "(model.compute_stress=true on the command line)."
                )
            stress_error = predicted[keys.STRESS] - batch[keys.STRESS]
            volume_per_atom = torch.linalg.det(batch[keys.CELL]).abs() / atoms
            loss = loss + self.stress_weight * self._term(stress_error * volume_per_atom[:, None, None])
        if self.site_energy_weight > 0:
            loss = loss + self.site_energy_weight * self._term(self._site_energy_error(predicted, batch))
        metrics = error_metrics(predicted, batch, self.metric_groups if detailed else None, per_element=detailed)
        return {"loss": loss, **metrics}

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


def error_metrics(
    predicted: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    metric_groups: Sequence[str] | None = None,
    per_element: bool = False,
) -> dict[str, Mean]:
    """Exact error metrics of one batch as (total, count) pairs, totals in float64.

    - ``energy_mae_per_atom``, ``energy_rmse_per_atom`` (meV/atom): over structures, of (E - E_ref) / atoms;
    - ``force_mae``, ``force_rmse`` (meV/Å): over force components;
    - ``stress_mae`` (meV/Å³): over stress components, when the batch has stress labels and ``predicted`` stress;
    - ``site_energy_mae`` (meV/atom): over atoms, when the batch has the teacher's site energies and
      ``predicted`` the student's;
    - with ``per_element``: ``force_mae/<symbol>`` (e.g. ``force_mae/Cu``) over the components of that
      element's atoms (this needs one host sync, to learn which elements the batch holds);
    - with ``metric_groups`` and a ``metric_group`` entry in the batch: ``energy_mae_per_atom/<group>`` and
      ``force_mae/<group>`` for every group present (``<group>`` is the name, e.g. ``config_type=md_600K``).
    """
    atoms = _atoms_per_structure(batch)
    energy_error = ((predicted[keys.ENERGY] - batch[keys.ENERGY]).detach().double() / atoms.double()).reshape(-1)
    force_error = (predicted[keys.FORCES] - batch[keys.FORCES]).detach().double().reshape(-1, 3)
    abs_force = force_error.abs()
    out: dict[str, Mean] = {
        "energy_mae_per_atom": Mean(1e3 * energy_error.abs().sum(), _count(energy_error, energy_error.numel())),
        "energy_rmse_per_atom": RootMean(1e6 * energy_error.pow(2).sum(), _count(energy_error, energy_error.numel())),
        "force_mae": Mean(1e3 * abs_force.sum(), _count(force_error, force_error.numel())),
        "force_rmse": RootMean(1e6 * force_error.pow(2).sum(), _count(force_error, force_error.numel())),
    }
    if keys.STRESS in batch and keys.STRESS in predicted:
        stress_error = (predicted[keys.STRESS] - batch[keys.STRESS]).detach().double()
        out["stress_mae"] = Mean(1e3 * stress_error.abs().sum(), _count(stress_error, stress_error.numel()))
    if keys.SITE_ENERGIES in batch and keys.SITE_ENERGIES in predicted:
        site_error = (predicted[keys.SITE_ENERGIES] - batch[keys.SITE_ENERGIES]).detach().double()
        out["site_energy_mae"] = Mean(1e3 * site_error.abs().sum(), _count(site_error, site_error.numel()))
    if per_element and keys.ATOMIC_NUMBERS in batch:
        out.update(_per_element(abs_force, batch[keys.ATOMIC_NUMBERS].reshape(-1)))
    if metric_groups is not None and keys.METRIC_GROUP in batch and keys.BATCH in batch:
        out.update(_per_group(energy_error, abs_force, batch, metric_groups))
    return out


def _count(like: torch.Tensor, value: int) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64, device=like.device)


def _per_element(abs_force: torch.Tensor, numbers: torch.Tensor) -> dict[str, Mean]:
    from ase.data import chemical_symbols

    out: dict[str, Mean] = {}
    for z in torch.unique(numbers).tolist():
        mine = numbers == z
        name = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
        out[f"force_mae/{name}"] = Mean(1e3 * abs_force[mine].sum(), 3.0 * mine.sum().double())
    return out


def _per_group(
    energy_error: torch.Tensor, abs_force: torch.Tensor, batch: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, Mean]:
    group = batch[keys.METRIC_GROUP]
    atom_group = group[batch[keys.BATCH]]
    out: dict[str, Mean] = {}
    for index in torch.unique(group[group >= 0]).tolist():
        if index >= len(names):
            raise IndexError(f"metric_group index {index} has no name; the loss knows {len(names)} groups.")
        structures, atoms = group == index, atom_group == index
        out[f"energy_mae_per_atom/{names[index]}"] = Mean(
            1e3 * energy_error[structures].abs().sum(), structures.sum().double()
        )
        out[f"force_mae/{names[index]}"] = Mean(1e3 * abs_force[atoms].sum(), 3.0 * atoms.sum().double())
    return out


def _atoms_per_structure(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if keys.NUM_ATOMS in batch:
        return batch[keys.NUM_ATOMS].to(batch[keys.POSITIONS].dtype)
    positions = batch[keys.POSITIONS]  # fixed-size clusters: (structures, atoms, 3)
    return torch.full(positions.shape[:1], positions.shape[-2], dtype=positions.dtype, device=positions.device)
