"""When molecular dynamics has become unstable: the one check every engine's run goes through.

A run is unstable when an energy is not finite or two atoms came closer than a bound (a student that lets
atoms fall into each other has left the region it was trained on; its forces there are meaningless).
:class:`StabilityGuard` holds the bound and names the first violation; :func:`closest_approach` measures
the smallest interatomic distance of a structure (periodic images included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.neighbors import neighbor_list

CLOSEST_APPROACH_FRACTION = 0.5
"""Default bound: this fraction of the closest approach in the starting structure."""
SEARCH_RADIUS = 4.0
"""Å. Pairs farther apart than this are not looked at by :func:`closest_approach` (inf when none is closer)."""


def closest_approach(atoms: Any, radius: float = SEARCH_RADIUS) -> float:
    """Smallest distance between two atoms of ``atoms`` (Å), periodic images included; inf when no pair is
    within ``radius``, NaN when a position is not finite."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        return math.nan
    edge_index, shifts = neighbor_list(positions, atoms.cell.array, atoms.pbc, radius)
    if edge_index.shape[1] == 0:
        return math.inf
    i, j = edge_index
    vectors = positions[j] - positions[i] + shifts @ atoms.cell.array
    return float(np.sqrt((vectors**2).sum(axis=1).min()))


@dataclass(frozen=True)
class StabilityGuard:
    """The bound a run must respect: no two atoms closer than ``min_distance`` Å, every energy finite."""

    min_distance: float

    @classmethod
    def for_structure(cls, atoms: Any, min_distance: float | None = None) -> StabilityGuard:
        """``min_distance`` Å, or by default :data:`CLOSEST_APPROACH_FRACTION` of the structure's closest approach."""
        if min_distance is None:
            start = closest_approach(atoms)
            min_distance = CLOSEST_APPROACH_FRACTION * start if math.isfinite(start) else 0.0
        if not (min_distance >= 0 and math.isfinite(min_distance)):
            raise ValueError(f"min_distance={min_distance} is invalid: the bound must be a finite number >= 0 (Å).")
        return cls(float(min_distance))

    def violation(self, step: int, energy: float, closest: float) -> str | None:
        """Why the run is unstable at ``step`` (potential ``energy`` in eV, ``closest`` approach in Å), or None."""
        if not math.isfinite(energy):
            return f"the potential energy became {energy} at step {step}"
        if math.isnan(closest):
            return f"positions became non-finite at step {step}"
        if closest < self.min_distance:
            return (
                f"two atoms came {closest:.3f} Å apart by step {step}, closer than the bound of "
                f"{self.min_distance:.3f} Å (min_distance)"
            )
        return None
