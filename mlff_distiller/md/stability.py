"""When molecular dynamics has become unstable: the one check every engine's run goes through.

A run is unstable when an energy is not finite or two atoms came closer than a bound (a student that lets
atoms fall into each other has left the region it was trained on; its forces there are meaningless).
:class:`StabilityGuard` holds the bound, optionally one per element pair, and names the first violation;
:func:`closest_approach` measures the smallest interatomic distance of a structure (periodic images
included), :func:`closest_pairs` the smallest per element pair.

One bound for all pairs is set by the closest pair there is (a bond), so it cannot see a collapse between
elements that never come that close: in water the O-H bond sets ~0.5 Å, and a student whose H-O-H angle
closes to 30° (H-H 0.5 Å) or whose oxygens meet at 1 Å would pass it. Per-pair bounds see both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.neighbors import neighbor_list

CLOSEST_APPROACH_FRACTION = 0.5
"""Default bound: this fraction of the closest approach in the starting structure."""
SEARCH_RADIUS = 4.0
"""Å. Pairs farther apart than this are not looked at by :func:`closest_approach` (inf when none is closer)."""


def _pair_distances(atoms: Any, radius: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(edge_index (2, E), distances (E,)) of the pairs within ``radius``, periodic images included; None when a
    position is not finite."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        return None
    edge_index, shifts = neighbor_list(positions, atoms.cell.array, atoms.pbc, radius)
    i, j = edge_index
    return edge_index, np.sqrt(((positions[j] - positions[i] + shifts @ atoms.cell.array) ** 2).sum(axis=1))


def closest_approach(atoms: Any, radius: float = SEARCH_RADIUS) -> float:
    """Smallest distance between two atoms of ``atoms`` (Å), periodic images included; inf when no pair is
    within ``radius``, NaN when a position is not finite."""
    pairs = _pair_distances(atoms, radius)
    if pairs is None:
        return math.nan
    return float(pairs[1].min()) if pairs[1].size else math.inf


def closest_pairs(atoms: Any, radius: float = SEARCH_RADIUS) -> dict[tuple[int, int], tuple[float, int, int]]:
    """Per element pair (atomic numbers, smaller first) within ``radius``: the smallest distance (Å, periodic
    images included) and the two atoms' indices."""
    pairs = _pair_distances(atoms, radius)
    if pairs is None or not pairs[1].size:
        return {}
    (i, j), distances = pairs
    numbers = np.asarray(atoms.numbers)
    low, high = np.minimum(numbers[i], numbers[j]), np.maximum(numbers[i], numbers[j])
    found: dict[tuple[int, int], tuple[float, int, int]] = {}
    for a, b in {(int(x), int(y)) for x, y in zip(low, high)}:
        mask = np.flatnonzero((low == a) & (high == b))
        k = mask[np.argmin(distances[mask])]
        found[(a, b)] = (float(distances[k]), int(i[k]), int(j[k]))
    return found


def pair_name(pair: tuple[int, int]) -> str:
    """``(1, 8)`` -> ``"H-O"``."""
    from ase.data import chemical_symbols

    return "-".join(chemical_symbols[z] for z in sorted(pair))


def parse_pair(name: str) -> tuple[int, int]:
    """``"O-H"`` or ``"H-O"`` -> ``(1, 8)``; ValueError for anything else."""
    from ase.data import atomic_numbers

    parts = str(name).split("-")
    if len(parts) != 2 or not all(part in atomic_numbers and atomic_numbers[part] > 0 for part in parts):
        raise ValueError(f"{name!r} is not an element pair: write two element symbols joined by '-', e.g. 'O-H'.")
    a, b = (atomic_numbers[part] for part in parts)
    return (a, b) if a <= b else (b, a)


def closest_contacts(structures: Iterable[Any], radius: float = SEARCH_RADIUS) -> dict[str, float]:
    """The closest contact of each element pair over ``structures`` (Å), by :func:`pair_name`."""
    found: dict[tuple[int, int], float] = {}
    for atoms in structures:
        for pair, (distance, _, _) in closest_pairs(atoms, radius).items():
            found[pair] = min(distance, found.get(pair, math.inf))
    return {pair_name(pair): distance for pair, distance in sorted(found.items())}


@dataclass(frozen=True)
class StabilityGuard:
    """The bound a run must respect: no two atoms closer than ``min_distance`` Å, nor than
    ``pair_min_distance[(Z_a, Z_b)]`` Å for a pair of those elements; every energy finite."""

    min_distance: float
    pair_min_distance: Mapping[tuple[int, int], float] = field(default_factory=dict)

    @classmethod
    def for_structure(
        cls, atoms: Any, min_distance: float | None = None, pair_min_distance: Mapping[str, float] | None = None
    ) -> StabilityGuard:
        """``min_distance`` Å, or by default :data:`CLOSEST_APPROACH_FRACTION` of the structure's closest approach;
        ``pair_min_distance`` by pair name (``{"O-H": 0.5}``, either order)."""
        if min_distance is None:
            start = closest_approach(atoms)
            min_distance = CLOSEST_APPROACH_FRACTION * start if math.isfinite(start) else 0.0
        if not (min_distance >= 0 and math.isfinite(min_distance)):
            raise ValueError(f"min_distance={min_distance} is invalid: the bound must be a finite number >= 0 (Å).")
        pairs = {}
        for name, bound in (pair_min_distance or {}).items():
            if not (isinstance(bound, (int, float)) and bound >= 0 and math.isfinite(bound)):
                raise ValueError(f"pair_min_distance[{name!r}]={bound!r} is invalid: a finite number >= 0 (Å).")
            pairs[parse_pair(name)] = float(bound)
        return cls(float(min_distance), pairs)

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

    def pair_violation(self, step: int, atoms: Any) -> str | None:
        """Why ``atoms`` at ``step`` breaks a per-pair bound (the pair farthest inside its bound), or None."""
        if not self.pair_min_distance:
            return None
        worst = None
        reach = max(SEARCH_RADIUS, *self.pair_min_distance.values())  # a bound beyond 4 Å is still seen
        for pair, (distance, i, j) in closest_pairs(atoms, reach).items():
            bound = self.pair_min_distance.get(pair)
            if bound is not None and distance < bound and (worst is None or distance / bound < worst[0]):
                worst = (distance / bound, pair, distance, i, j, bound)
        if worst is None:
            return None
        _, pair, distance, i, j, bound = worst
        return (
            f"atoms {i} and {j} ({pair_name(pair)}) came {distance:.3f} Å apart by step {step}, closer than the "
            f"{pair_name(pair)} bound of {bound:.3f} Å (pair_min_distance)"
        )
