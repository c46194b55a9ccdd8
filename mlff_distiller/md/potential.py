"""`StudentPotential`: the one interface through which every MD engine calls a student.

It takes positions, atomic numbers, cells and periodicity of one or many systems as arrays or tensors,
keeps a neighbour list per system and returns energies, forces and (on request) stress as tensors. The ASE
calculator, the LAMMPS callback, the OpenMM force, the i-PI client and the torch-sim model all call it.

Per-call overhead is kept low for MD-sized systems:

* **Neighbour lists with a skin.** Each system's list is built (by ``vesin``) with radius cutoff + skin and
  reused until some atom of that system has moved more than skin/2 from where it was at the build (or the
  cell, periodicity or elements changed). Two atoms that each moved less than skin/2 cannot have come
  closer than cutoff from farther than cutoff + skin, so the pairs within the cutoff are always among the
  candidates; every call keeps exactly those (``|r_ij| < cutoff``), in the order a fresh list has them, so
  the result equals a fresh-list evaluation to round-off. Atoms wrapped back into the cell by an engine are
  followed through the lattice translation they made.
* **A lean path.** The model is a private copy in eval mode with frozen parameters (no weight gradients),
  stress (a strain derivative) is computed only when asked for, elements are checked only when the atomic
  numbers change, and the only host synchronisations per call are the displacement test and the size of
  the kept edge set.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import keys
from ..data.neighbors import neighbor_list

DEFAULT_SKIN = 1.0
"""Å. Verlet skin of the reused neighbour lists; a list then lasts ~10-50 MD steps at room temperature."""


@dataclass
class _SystemList:
    """One system's pairs within a radius."""

    edge_index: torch.Tensor  # (2, E) int64, 0-based within the system
    cell_shifts: torch.Tensor  # (E, 3) int64


@dataclass
class NeighborStats:
    """How often lists were built and reused; read by tests and the MD summary."""

    calls: int = 0
    builds: int = 0
    """System lists built (a batch of S systems built at once counts S)."""
    closest: float = math.inf
    """Smallest interatomic distance seen in any call since :meth:`StudentPotential.reset_closest` (Å)."""
    nonfinite_calls: int = 0
    """Calls whose positions were not all finite (their outputs are NaN)."""


def as_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` (array, list or tensor) as a tensor of ``dtype`` on ``device``, copied only when needed."""
    if torch.is_tensor(value):
        return value.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


class StudentPotential:
    """A trained student as a function of (positions, numbers, cell, pbc) for one or many systems.

    Args:
        model: an atomistic student (``SchNet``, ``PaiNN``, ...: has ``cutoff``); copied, never modified.
        device: where the model runs.
        dtype: floating-point precision of the model and of the returned tensors (float64 for physics checks).
        skin: Å added to the cutoff for reusable neighbour lists; 0 builds a fresh list every call.

    Call it with ``positions`` (N, 3) Å, ``numbers`` (N,), ``cell`` (3, 3) or (S, 3, 3) Å (rows are lattice
    vectors), ``pbc`` (3,) or (S, 3) bools and ``num_atoms`` (S,) (omit for one system); get a dict with
    ``energy`` (S,) eV, ``forces`` (N, 3) eV/Å and, with ``stress=True``, ``stress`` (S, 3, 3) eV/Å³ (ASE's
    sign, (1/V) dE/dstrain). A structure with an element the student was never trained on raises
    :class:`~mlff_distiller.models.base.UnknownElementError`.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        skin: float = DEFAULT_SKIN,
    ) -> None:
        if not hasattr(model, "cutoff"):
            raise TypeError(
                f"{type(model).__name__} has no 'cutoff' attribute; StudentPotential needs an atomistic student "
                "(e.g. SchNet, PaiNN)."
            )
        if not (skin >= 0 and math.isfinite(skin)):
            raise ValueError(f"skin={skin} is invalid: the neighbour-list skin must be a finite number >= 0 (Å).")
        self.device = torch.device(device)
        self.dtype = dtype
        self.skin = float(skin)
        # A copy: the caller's model (maybe still training) keeps its dtype, mode and requires_grad.
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # only d/dpositions (and d/dstrain) are needed
        self.cutoff = float(self.model.cutoff)
        self.stats = NeighborStats()
        self._lists: list[_SystemList] = []
        self._key: tuple | None = None  # numbers, counts, cell, pbc of the cached lists
        self._numbers_checked: torch.Tensor | None = None
        self._closest = torch.tensor(math.inf, dtype=dtype, device=self.device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], use_ema: bool = True, **kwargs: Any) -> StudentPotential:
        """The student of an ``mlff-train`` checkpoint (a file, or a run directory: its best model)."""
        return cls(load_student(path, use_ema=use_ema), **kwargs)

    @property
    def elements(self) -> list[int]:
        """Atomic numbers the student was trained on (empty: it accepts any)."""
        return list(getattr(self.model, "elements", []))

    def reset_closest(self) -> float:
        """The smallest interatomic distance seen since the last reset (Å; inf when no pair was within the
        cutoff), and start a new watch."""
        closest = float(self._closest)
        self._closest.fill_(math.inf)
        self.stats.closest = closest
        return closest

    def __call__(
        self,
        positions: Any,
        numbers: Any,
        cell: Any = None,
        pbc: Any = None,
        num_atoms: Sequence[int] | torch.Tensor | None = None,
        stress: bool = False,
        reuse_neighbors: bool = True,
    ) -> dict[str, torch.Tensor]:
        positions = as_tensor(positions, self.dtype, self.device).reshape(-1, 3)
        numbers = as_tensor(numbers, torch.long, self.device).reshape(-1)
        n = positions.shape[0]
        counts = [n] if num_atoms is None else [int(c) for c in num_atoms]
        if numbers.shape[0] != n or sum(counts) != n or min(counts, default=1) < 1:
            raise ValueError(
                f"StudentPotential got {n} positions, {numbers.shape[0]} atomic numbers and num_atoms={counts}; "
                "they must agree (one row per atom, every system at least one atom)."
            )
        cells, periodic = self._cells(cell, pbc, len(counts))
        self._check_elements(numbers)
        self.stats.calls += 1
        if reuse_neighbors:
            edge_index, shifts, positions = self._reused_candidates(positions, numbers, counts, cells, periodic)
        else:
            edge_index, shifts = self._build(positions, counts, cells, periodic, self.cutoff)
        batch = self._batch(positions, numbers, counts, cells, periodic, edge_index, shifts)
        self.model.compute_stress = stress
        output = self.model(batch)
        result = {keys.ENERGY: output[keys.ENERGY].detach(), keys.FORCES: output[keys.FORCES].detach()}
        if stress:
            result[keys.STRESS] = output[keys.STRESS].detach()
        return result

    def compute_atoms(self, atoms: Any, stress: bool = False) -> dict[str, np.ndarray | float]:
        """Energy (eV), forces (eV/Å) and optionally stress (Voigt, eV/Å³) of one ASE ``Atoms``, as numpy."""
        out = self(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, stress=stress)
        result: dict[str, np.ndarray | float] = {
            "energy": float(out[keys.ENERGY].sum()),
            "forces": out[keys.FORCES].cpu().double().numpy(),
        }
        if stress:
            result["stress"] = voigt(out[keys.STRESS][0].cpu().double().numpy())
        return result

    # ------------------------------------------------------------------ internals
    def _cells(self, cell: Any, pbc: Any, systems: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells (S, 3, 3) in the model dtype and periodicity (S, 3) bool."""
        if cell is None:
            cells = torch.zeros(systems, 3, 3, dtype=self.dtype, device=self.device)
        else:
            cells = as_tensor(cell, self.dtype, self.device).reshape(-1, 3, 3).expand(systems, 3, 3)
        flags = torch.zeros(3, dtype=torch.bool) if pbc is None else torch.as_tensor(np.asarray(pbc), dtype=torch.bool)
        periodic = flags.reshape(-1, 1).expand(-1, 3) if flags.numel() == 1 else flags.reshape(-1, 3)
        periodic = periodic.to(self.device).expand(systems, 3)
        if cells.shape[0] != systems or periodic.shape[0] != systems:
            raise ValueError(f"StudentPotential got cells for {cells.shape[0]} systems and num_atoms for {systems}.")
        return cells.contiguous(), periodic.contiguous()

    def _check_elements(self, numbers: torch.Tensor) -> None:
        known = self._numbers_checked
        if known is not None and known.shape == numbers.shape and bool((known == numbers).all()):
            return
        if hasattr(self.model, "check_elements"):
            self.model.check_elements(numbers, where="The structure given to the student")
        self._numbers_checked = numbers.clone()

    def _build(
        self, positions: torch.Tensor, counts: list[int], cells: torch.Tensor, periodic: torch.Tensor, radius: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh lists (within ``radius``) of every system, concatenated with atom offsets."""
        return _concatenate(self._lists_of(positions, counts, cells, periodic, radius), counts, self.device)

    def _lists_of(
        self, positions: torch.Tensor, counts: list[int], cells: torch.Tensor, periodic: torch.Tensor, radius: float
    ) -> list[_SystemList]:
        return [
            self._system_list(positions[start : start + count], cells[s], periodic[s], radius)
            for s, (start, count) in enumerate(_starts(counts))
        ]

    def _system_list(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, radius: float
    ) -> _SystemList:
        self.stats.builds += 1
        edge_index, shifts = neighbor_list(
            positions.detach().cpu().double().numpy(), cell.cpu().double().numpy(), pbc.cpu().numpy(), radius
        )
        return _SystemList(torch.from_numpy(edge_index).to(self.device), torch.from_numpy(shifts).to(self.device))

    def _reused_candidates(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        counts: list[int],
        cells: torch.Tensor,
        periodic: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edges within the cutoff from the cached candidate lists (rebuilding the systems that moved too far),
        and the positions to evaluate them at (atoms an engine wrapped into the cell are translated back)."""
        key = (tuple(counts), numbers, cells, periodic)
        finite = bool(positions.isfinite().all())
        if not finite:
            # An exploding run: no list can be built from NaN positions. Evaluate on the old list, so that the
            # outputs are NaN too and the MD driver stops the run (md.stability), instead of failing here.
            self.stats.nonfinite_calls += 1
            if self._key is None or self._key[0] != key[0]:
                raise ValueError("StudentPotential got non-finite positions (NaN or inf) and has no list to reuse.")
        if finite and not self._same_key(key):
            self._lists = self._lists_of(positions, counts, cells, periodic, self.cutoff + self.skin)
            self._key = (key[0], numbers.clone(), cells.clone(), periodic.clone())
            self._candidates = _concatenate(self._lists, counts, self.device)
            self._reference = positions.clone()
            shifted = positions
        else:
            shifted = self._follow_images(positions, counts, self._key[2], self._key[3])
        edge_index, shifts = self._candidates
        kept = self._within_cutoff(shifted, counts, cells, edge_index, shifts)
        return edge_index[:, kept], shifts[kept], shifted

    def _same_key(self, key: tuple) -> bool:
        if self._key is None or self.skin == 0:
            return False
        counts, numbers, cells, periodic = key
        old_counts, old_numbers, old_cells, old_periodic = self._key
        return (
            counts == old_counts
            and bool((numbers == old_numbers).all())
            and bool(torch.equal(cells, old_cells))
            and bool(torch.equal(periodic, old_periodic))
        )

    def _follow_images(
        self, positions: torch.Tensor, counts: list[int], cells: torch.Tensor, periodic: torch.Tensor
    ) -> torch.Tensor:
        """``positions`` moved by whole lattice vectors back next to the reference positions; systems in
        which an atom moved more than skin/2 get a fresh candidate list (and new reference positions)."""
        system = torch.repeat_interleave(
            torch.arange(len(counts), device=self.device), torch.tensor(counts, device=self.device)
        )
        displacement = positions - self._reference
        cell_of_atom = cells[system]
        images = torch.zeros_like(displacement)
        if bool(periodic.any()):
            # Fractional displacement rounded to whole cells along periodic directions only.
            # Open systems may have no cell at all: solve with the identity there (their images stay 0).
            eye = torch.eye(3, dtype=cells.dtype, device=cells.device)
            solvable = torch.where(periodic.any(dim=1)[:, None, None], cells, eye)[system]
            fractional = torch.linalg.solve(solvable.transpose(1, 2), displacement.unsqueeze(-1)).squeeze(-1)
            images = torch.where(periodic[system], torch.round(fractional), torch.zeros_like(fractional))
            displacement = displacement - torch.einsum("ni,nij->nj", images, cell_of_atom)
        moved = torch.zeros(len(counts), dtype=self.dtype, device=self.device)
        moved = moved.scatter_reduce(0, system, displacement.norm(dim=1), reduce="amax")
        stale = torch.nonzero(moved > 0.5 * self.skin).flatten().tolist()
        shifted = positions - torch.einsum("ni,nij->nj", images, cell_of_atom)
        if stale:
            starts = list(_starts(counts))
            for s in stale:
                start, count = starts[s]
                self._lists[s] = self._system_list(
                    positions[start : start + count], cells[s], self._key[3][s], self.cutoff + self.skin
                )
                self._reference[start : start + count] = positions[start : start + count]
                shifted[start : start + count] = positions[start : start + count]
            self._candidates = _concatenate(self._lists, counts, self.device)
        return shifted

    def _within_cutoff(
        self,
        positions: torch.Tensor,
        counts: list[int],
        cells: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
    ) -> torch.Tensor:
        """Indices of the candidate edges shorter than the cutoff; also updates the closest-approach watch."""
        if edge_index.shape[1] == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        system = torch.repeat_interleave(
            torch.arange(len(counts), device=self.device), torch.tensor(counts, device=self.device)
        )
        i, j = edge_index
        vectors = positions[j] - positions[i] + torch.einsum("ek,ekl->el", shifts.to(self.dtype), cells[system[i]])
        squared = (vectors * vectors).sum(dim=1)
        self._closest = torch.minimum(self._closest, squared.min().sqrt())
        return torch.nonzero(squared < self.cutoff**2).flatten()

    def _batch(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        counts: list[int],
        cells: torch.Tensor,
        periodic: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        num_atoms = torch.tensor(counts, device=self.device)
        return {
            keys.POSITIONS: positions,
            keys.ATOMIC_NUMBERS: numbers,
            keys.CELL: cells,
            keys.PBC: periodic,
            keys.BATCH: torch.repeat_interleave(torch.arange(len(counts), device=self.device), num_atoms),
            keys.NUM_ATOMS: num_atoms,
            keys.EDGE_INDEX: edge_index,
            keys.CELL_SHIFTS: shifts.to(self.dtype),
        }


def _starts(counts: list[int]):
    start = 0
    for count in counts:
        yield start, count
        start += count


def _concatenate(
    lists: list[_SystemList], counts: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = [start for start, _ in _starts(counts)]
    if not lists:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    edge_index = torch.cat([item.edge_index + offset for item, offset in zip(lists, offsets)], dim=1)
    return edge_index, torch.cat([item.cell_shifts for item in lists])


def voigt(stress: np.ndarray) -> np.ndarray:
    """A 3x3 stress as ASE's Voigt vector (xx, yy, zz, yz, xz, xy)."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])


def load_student(path: str | os.PathLike[str], use_ema: bool = True) -> nn.Module:
    """Rebuild the student of an ``mlff-train`` checkpoint file or run directory (EMA weights when kept).

    A run directory means its ``checkpoints/best_model.pt`` (else its newest readable checkpoint).
    """
    from pathlib import Path

    from hydra.utils import instantiate

    from ..training.checkpoint import CheckpointError, load_checkpoint_file, load_model_weights, read_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not exist; pass a checkpoint file or an mlff-train run directory."
        )
    best = [
        p for p in (path / "checkpoints" / "best_model.pt", path / "best_model.pt") if path.is_dir() and p.is_file()
    ]
    path, state = (best[0], load_checkpoint_file(best[0])) if best else read_checkpoint(path)
    model_config = state.get("config", {}).get("extra", {}).get("model_config")
    if model_config is None:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not describe its model (no model_config); it was not written by "
            "mlff-train. Build the model yourself and pass it to StudentPotential(model) / StudentCalculator(model)."
        )
    model = instantiate(model_config)
    load_model_weights(model, path, use_ema=use_ema)
    return model
