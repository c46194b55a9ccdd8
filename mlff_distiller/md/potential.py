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
  stress (a strain derivative) is computed only when asked for, elements are checked only when a list is built
  for new atoms, and the per-call work of list reuse is a few tensor operations on cached data (inverse
  cells, per-edge lattice translations, batch indices).

Non-finite positions (an exploding run) give NaN energies and forces without calling the model.
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
from ..data.neighbors import neighbor_list, reverse_pair_order

DEFAULT_SKIN = 1.0
"""Å. Verlet skin of the reused neighbour lists; a list then lasts ~10-50 MD steps at room temperature."""


@dataclass
class NeighborStats:
    """How often lists were built and reused; read by tests and the MD summary."""

    calls: int = 0
    builds: int = 0
    """System lists built (a batch of S systems built at once counts S)."""
    closest: float = math.inf
    """Smallest interatomic distance seen in any call since :meth:`StudentPotential.reset_closest` (Å)."""
    nonfinite_calls: int = 0
    """Calls whose positions were not all finite (their outputs are NaN, the model is not called)."""


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
        from ..memory import keep_freed_memory

        keep_freed_memory()  # repeated calls reuse their large tensors (no page faults per call; see memory.py)
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
        self._cache: _Cache | None = None
        self._closest = torch.tensor(math.inf, dtype=dtype, device=self.device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], use_ema: bool = True, **kwargs: Any) -> StudentPotential:
        """The student of an ``mlff-train`` checkpoint (a file, or a run directory: its best model)."""
        from ..evaluation import load_student

        return cls(load_student(path, use_ema=use_ema).model, **kwargs)

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
        counts = (n,) if num_atoms is None else tuple(int(c) for c in num_atoms)
        if numbers.shape[0] != n or sum(counts) != n or min(counts, default=1) < 1:
            raise ValueError(
                f"StudentPotential got {n} positions, {numbers.shape[0]} atomic numbers and num_atoms={list(counts)}; "
                "they must agree (one row per atom, every system at least one atom)."
            )
        cells, periodic = self._cells(cell, pbc, len(counts))
        self.stats.calls += 1
        if reuse_neighbors and self.skin > 0:
            cache = self._current_cache(positions, numbers, counts, cells, periodic)
            positions = cache.follow(positions, self)
            if positions is None:  # non-finite positions (an exploding run): NaN out, for the MD driver to see
                return self._nan_result(n, len(counts), stress)
        else:
            cache = self._new_cache(positions, numbers, counts, cells, periodic, self.cutoff)
        batch = cache.batch(positions, self)
        self.model.compute_stress = stress
        output = self.model(batch)
        result = {keys.ENERGY: output[keys.ENERGY].detach(), keys.FORCES: output[keys.FORCES].detach()}
        if stress:
            result[keys.STRESS] = output[keys.STRESS].detach()
        if keys.SITE_ENERGIES in output:  # per-atom energies: a student can label site energies too
            result[keys.SITE_ENERGIES] = output[keys.SITE_ENERGIES].detach()
        return result

    def compute_atoms(self, atoms: Any, stress: bool = False) -> dict[str, np.ndarray | float]:
        """Energy (eV), forces (eV/Å), per-atom energies (ASE's ``energies``, eV) and optionally stress (Voigt,
        eV/Å³) of one ASE ``Atoms``, as numpy."""
        out = self(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, stress=stress)
        result: dict[str, np.ndarray | float] = {
            "energy": float(out[keys.ENERGY].sum()),
            "forces": out[keys.FORCES].cpu().double().numpy(),
        }
        if stress:
            result["stress"] = voigt(out[keys.STRESS][0].cpu().double().numpy())
        if keys.SITE_ENERGIES in out:
            result["energies"] = out[keys.SITE_ENERGIES].cpu().double().numpy()
        return result

    # ------------------------------------------------------------------ internals
    def _nan_result(self, atoms: int, systems: int, stress: bool) -> dict[str, torch.Tensor]:
        self.stats.nonfinite_calls += 1
        nan = math.nan
        result = {
            keys.ENERGY: torch.full((systems,), nan, dtype=self.dtype, device=self.device),
            keys.FORCES: torch.full((atoms, 3), nan, dtype=self.dtype, device=self.device),
        }
        if stress:
            result[keys.STRESS] = torch.full((systems, 3, 3), nan, dtype=self.dtype, device=self.device)
        return result

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

    def _current_cache(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        counts: tuple[int, ...],
        cells: torch.Tensor,
        periodic: torch.Tensor,
    ) -> _Cache:
        """The cached candidate lists when they were built for these atoms, cell and periodicity, else new ones."""
        cache = self._cache
        if cache is not None and cache.counts == counts and cache.same(numbers, cells, periodic):
            return cache
        if not bool(positions.isfinite().all()):
            raise ValueError("StudentPotential got non-finite positions (NaN or inf) for a new structure.")
        self._cache = self._new_cache(positions, numbers, counts, cells, periodic, self.cutoff + self.skin)
        return self._cache

    def _new_cache(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        counts: tuple[int, ...],
        cells: torch.Tensor,
        periodic: torch.Tensor,
        radius: float,
    ) -> _Cache:
        if hasattr(self.model, "check_elements"):
            self.model.check_elements(numbers, where="The structure given to the student")
        cache = _Cache(positions.clone(), numbers.clone(), counts, cells.clone(), periodic.clone(), radius, self.device)
        for s in range(len(counts)):
            cache.lists.append(self._system_list(cache, s))
        cache.concatenate()
        return cache

    def _system_list(self, cache: _Cache, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """System ``s``'s pairs within the cache's radius at its reference positions (by vesin), ordered in reverse
        pairs when the list allows it (edge k + E/2 reverses edge k: the students then share each pair's filters
        without sorting, and a compiled student can run)."""
        self.stats.builds += 1
        start, count = cache.starts[s], cache.counts[s]
        edge_index, shifts = neighbor_list(
            cache.reference[start : start + count].detach().cpu().double().numpy(),
            cache.cells[s].cpu().double().numpy(),
            cache.periodic[s].cpu().numpy(),
            cache.radius,
        )
        order = reverse_pair_order(edge_index, shifts)
        if order is not None:
            edge_index, shifts = edge_index[:, order], shifts[order]
        cache.paired[s] = order is not None
        return torch.from_numpy(edge_index).to(self.device), torch.from_numpy(shifts).to(self.device)


class _Cache:
    """Candidate pairs of every system and what they were built for; the per-call work of list reuse."""

    def __init__(
        self,
        reference: torch.Tensor,
        numbers: torch.Tensor,
        counts: tuple[int, ...],
        cells: torch.Tensor,
        periodic: torch.Tensor,
        radius: float,
        device: torch.device,
    ) -> None:
        self.reference, self.numbers, self.counts = reference, numbers, counts
        self.cells, self.periodic, self.radius = cells, periodic, radius
        self.starts = [sum(counts[:s]) for s in range(len(counts))]
        self.num_atoms = torch.tensor(counts, device=device)
        self.system = torch.repeat_interleave(torch.arange(len(counts), device=device), self.num_atoms)
        self.any_periodic = bool(periodic.any())
        if self.any_periodic:
            # Open systems may have no cell at all: invert the identity there (their images stay 0).
            eye = torch.eye(3, dtype=cells.dtype, device=device)
            self.inverse = torch.linalg.inv(torch.where(periodic.any(dim=1)[:, None, None], cells, eye))
            self.periodic_atom = periodic[self.system]
        self.lists: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.paired = [False] * len(counts)

    def same(self, numbers: torch.Tensor, cells: torch.Tensor, periodic: torch.Tensor) -> bool:
        return bool(torch.equal(numbers, self.numbers) and torch.equal(cells, self.cells)) and torch.equal(
            periodic, self.periodic
        )

    def concatenate(self) -> None:
        """The systems' lists as one, with atom offsets, and each edge's lattice translation S @ cell. When every
        system's list is paired, so is the whole: the systems' first halves, then their second halves."""
        edges = [e + start for (e, _), start in zip(self.lists, self.starts)]
        shifts = [shifts for _, shifts in self.lists]
        self.all_paired = all(self.paired)
        if self.all_paired:
            halves = [e.shape[1] // 2 for e in edges]
            edges = [e[:, :h] for e, h in zip(edges, halves)] + [e[:, h:] for e, h in zip(edges, halves)]
            shifts = [x[:h] for x, h in zip(shifts, halves)] + [x[h:] for x, h in zip(shifts, halves)]
        self.edge_index = torch.cat(edges, dim=1)
        self.shifts = torch.cat(shifts)
        cell_of_edge = self.cells[self.system[self.edge_index[0]]]
        self.translations = torch.einsum("ek,ekl->el", self.shifts.to(self.cells.dtype), cell_of_edge)

    def follow(self, positions: torch.Tensor, potential: StudentPotential) -> torch.Tensor | None:
        """``positions`` moved by whole lattice vectors back next to the reference positions; the systems in which
        an atom moved more than skin/2 get new lists (and reference positions). None for non-finite positions."""
        displacement = positions - self.reference
        if self.any_periodic:
            fractional = torch.einsum("ni,nij->nj", displacement, self.inverse[self.system])
            images = torch.round(fractional) * self.periodic_atom
            positions = positions - torch.einsum("ni,nij->nj", images, self.cells[self.system])
            displacement = positions - self.reference
        moved = displacement.norm(dim=1)
        if len(self.counts) == 1:
            stale = [0] if not bool(moved.max() <= 0.5 * potential.skin) else []
        else:
            per_system = torch.zeros(len(self.counts), dtype=moved.dtype, device=moved.device)
            per_system = per_system.scatter_reduce(0, self.system, moved, reduce="amax")
            stale = torch.nonzero(~(per_system <= 0.5 * potential.skin)).flatten().tolist()
        if stale and not bool(positions.isfinite().all()):
            return None  # no list can be built from NaN positions
        for s in stale:
            start, count = self.starts[s], self.counts[s]
            self.reference[start : start + count] = positions[start : start + count]
            self.lists[s] = potential._system_list(self, s)
        if stale:
            self.concatenate()
        return positions

    def batch(self, positions: torch.Tensor, potential: StudentPotential) -> dict[str, torch.Tensor]:
        """The model's batch: the candidate edges shorter than the cutoff (the closest-approach watch is updated)."""
        edge_index, shifts = self.edge_index, self.shifts
        # A pair's two edges have the same length: paired lists are measured and cut on their first half.
        half = edge_index.shape[1] // 2 if self.all_paired else edge_index.shape[1]
        if half and self.radius > potential.cutoff:
            i, j = edge_index[:, :half]
            vectors = positions[j] - positions[i] + self.translations[:half]
            squared = (vectors * vectors).sum(dim=1)
            torch.minimum(potential._closest, squared.min().sqrt(), out=potential._closest)
            kept = torch.nonzero(squared < potential.cutoff**2).flatten()
            if self.all_paired:
                kept = torch.cat([kept, kept + half])
            edge_index, shifts = edge_index[:, kept], shifts[kept]
        paired = {}
        if self.all_paired:
            first = edge_index[0, : edge_index.shape[1] // 2]
            paired[keys.NUM_EDGE_PAIRS] = torch.bincount(self.system[first], minlength=len(self.counts))
        return {
            **paired,
            keys.POSITIONS: positions,
            keys.ATOMIC_NUMBERS: self.numbers,
            keys.CELL: self.cells,
            keys.PBC: self.periodic,
            keys.BATCH: self.system,
            keys.NUM_ATOMS: self.num_atoms,
            keys.EDGE_INDEX: edge_index,
            keys.CELL_SHIFTS: shifts.to(positions.dtype),
        }


def voigt(stress: np.ndarray) -> np.ndarray:
    """A 3x3 stress as ASE's Voigt vector (xx, yy, zz, yz, xz, xy)."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])
