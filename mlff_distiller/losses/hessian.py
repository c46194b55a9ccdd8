"""Hessian distillation (Amin et al., ICLR 2025): the student also matches rows of the teacher's energy Hessian.

The student's row c is -dF_c/dx, a vector-Jacobian product through its forces (a double backward; a
third-order derivative reaches the weights). The Hessian of a batch is block-diagonal over its
structures, so one product with a vector that picks one coordinate in *each* structure gives one row of
every structure at once: a step costs ``hessian_rows`` extra backward passes, whatever the batch size.
Teacher rows come with the data (:mod:`mlff_distiller.teachers.hessian`, batched as the ``hessian_*``
keys of :mod:`mlff_distiller.data.keys`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import keys

# The exact-metric term type is the loss-to-trainer protocol; nothing else of training is imported here.
from ..training.metrics import Mean
from .energy_force import EnergyForceLoss


def row_slots(row_structure: torch.Tensor, rows_per_structure: int, generator: torch.Generator | None) -> torch.Tensor:
    """Choose up to ``rows_per_structure`` of each structure's rows; (rows,) slot of each row, -1 if unused.

    Rows of one structure get distinct slots 0, 1, ..., so every slot holds at most one row per structure.
    With ``generator`` the choice is random; with None, every structure's first rows (in storage order).
    """
    count = row_structure.shape[0]
    key = row_structure.to(torch.float64)
    if generator is not None:
        key = key + torch.rand(count, generator=generator, dtype=torch.float64).to(key.device)
    else:
        key = key + torch.arange(count, dtype=torch.float64, device=key.device) / (count + 1)
    order = torch.argsort(key)
    in_order = row_structure[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=order.device) - torch.searchsorted(in_order, in_order)
    return torch.where(rank < rows_per_structure, rank, torch.full_like(rank, -1))


def student_hessian_entries(
    forces: torch.Tensor,
    positions: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    slots: torch.Tensor,
    num_slots: int,
    create_graph: bool,
) -> torch.Tensor:
    """The student's Hessian at the batch's Hessian entries, eV/Å²; (entries,), zero for rows with slot -1.

    ``forces`` must have been computed from ``positions`` with a graph (``create_graph=True``, which the
    students do when ``positions`` require grad); one vector-Jacobian product per slot.
    """
    flat_forces = forces.reshape(-1)
    row_coord, entry_row, entry_coord = (
        batch[keys.HESSIAN_ROW_COORD],
        batch[keys.HESSIAN_ENTRY_ROW],
        batch[keys.HESSIAN_ENTRY_COORD],
    )
    entries = torch.zeros(entry_row.shape[0], dtype=flat_forces.dtype, device=flat_forces.device)
    for slot in range(num_slots):
        in_slot = slots == slot
        pick = torch.zeros_like(flat_forces).index_fill(0, row_coord[in_slot], 1.0)
        (jacobian_rows,) = torch.autograd.grad(
            flat_forces, positions, grad_outputs=pick, retain_graph=True, create_graph=create_graph
        )
        hessian_rows = -jacobian_rows.reshape(-1)  # H = -dF/dx
        entries = entries + torch.where(in_slot[entry_row], hessian_rows[entry_coord], 0.0)
    return entries


class EnergyForceHessianLoss(EnergyForceLoss):
    """:class:`EnergyForceLoss` plus ``hessian_weight * L(H_student - H_teacher)`` over Hessian-row entries.

    Args (besides those of :class:`EnergyForceLoss`):
        hessian_weight: weight of the Hessian term (entries in eV/Å²; L is MSE or Huber as ``kind``).
        hessian_rows: rows per structure used per training step, drawn at random from the stored ones
            (each costs one extra backward pass).
        hessian_start_step: the term is off before this optimizer step (forces first, then curvature).
        seed: seeds the choice of rows (per call, so a resumed run draws as an uninterrupted one).

    Given to the Trainer as ``loss_fn``, it follows ``trainer.global_step`` through the two callback hooks it
    defines (the Trainer calls the hooks a loss_fn has; this module imports nothing of the trainer) and its
    ``calls`` counter is checkpointed; used without a Trainer, set ``loss.step`` yourself. In eval mode
    (validation, test) every stored row is compared and ``hessian_mae`` (meV/Å², exact: over every compared
    entry of the split) is reported whatever the step; in training it and ``hessian_loss`` are reported only
    while the term is on (averaged over the batches that had it). Batches without Hessian rows skip the term.
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
        hessian_weight: float = 1.0,
        hessian_rows: int = 1,
        hessian_start_step: int = 0,
        seed: int = 0,
        site_energy_weight: float = 0.0,
    ) -> None:
        super().__init__(
            energy_weight,
            force_weight,
            per_atom_energy,
            kind,
            huber_delta,
            stress_weight,
            metric_groups=metric_groups,
            site_energy_weight=site_energy_weight,
        )
        if hessian_weight < 0:
            raise ValueError(f"hessian_weight={hessian_weight} must be >= 0.")
        if hessian_rows < 1:
            raise ValueError(f"hessian_rows={hessian_rows} must be >= 1 (rows per structure per step).")
        if hessian_start_step < 0:
            raise ValueError(f"hessian_start_step={hessian_start_step} must be >= 0.")
        self.hessian_weight = hessian_weight
        self.hessian_rows = hessian_rows
        self.hessian_start_step = hessian_start_step
        self.seed = seed
        self.step = 0
        """Optimizer steps taken so far (kept equal to ``trainer.global_step`` by the callback hooks)."""
        self.calls = 0
        """Training calls so far; with ``seed`` it seeds the choice of rows."""

    @property
    def hessian_active(self) -> bool:
        """Whether the training loss includes the Hessian term at the current step."""
        return self.hessian_weight > 0 and self.step >= self.hessian_start_step

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | Mean]:
        has_rows = keys.HESSIAN_ROWS in batch and batch[keys.HESSIAN_ROW_COORD].numel() > 0
        wanted = has_rows and (self.hessian_active or not model.training)
        if not wanted:
            return super().__call__(model, batch)
        positions = batch[keys.POSITIONS].detach().requires_grad_(True)
        with torch.enable_grad():
            predicted = model({**batch, keys.POSITIONS: positions})
            out = self.terms(predicted, batch, detailed=not model.training)
            if model.training:
                stream = np.random.SeedSequence([self.seed, self.calls]).generate_state(1, np.uint64)[0]
                generator = torch.Generator().manual_seed(int(stream) >> 1)
                self.calls += 1
                slots, num_slots = self._sample(batch, generator), self.hessian_rows
            else:
                slots = self._sample(batch, None, rows_per_structure=batch[keys.HESSIAN_ROW_COORD].shape[0])
                num_slots = int(slots.max()) + 1
            student = student_hessian_entries(
                predicted[keys.FORCES], positions, batch, slots, num_slots, create_graph=model.training
            )
        used = slots[batch[keys.HESSIAN_ENTRY_ROW]] >= 0
        error = (student - batch[keys.HESSIAN_ROWS].to(student.dtype))[used]
        if model.training:
            hessian_loss = self._term(error)
            out["loss"] = out["loss"] + self.hessian_weight * hessian_loss
            out["hessian_loss"] = hessian_loss.detach()
        absolute = error.detach().double().abs()
        out["hessian_mae"] = Mean(1e3 * absolute.sum(), absolute.new_tensor(float(absolute.numel())))
        return out

    def _sample(
        self,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None,
        rows_per_structure: int | None = None,
    ) -> torch.Tensor:
        row_structure = batch[keys.BATCH][batch[keys.HESSIAN_ROW_COORD] // 3]
        return row_slots(row_structure, rows_per_structure or self.hessian_rows, generator)

    # Trainer hooks: follow its optimizer step (also after a resume).
    def on_fit_start(self, trainer: Any) -> None:
        self.step = trainer.global_step

    def on_optimizer_step(self, trainer: Any) -> None:
        self.step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
