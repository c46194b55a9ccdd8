"""`AtomsBatch`: several structures concatenated atom-wise, with their neighbour lists."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import keys


class AtomsBatch(Mapping[str, torch.Tensor]):
    """Read-only mapping of batch keys (see :mod:`mlff_distiller.data.keys`) to tensors.

    ``len(batch)`` is the number of structures (the Trainer averages metrics per structure);
    ``batch.to(device)`` moves every tensor. An unknown key raises ``KeyError`` naming the known ones.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [k for k in keys.ATOMS_KEYS if k not in tensors]
        if missing:
            raise KeyError(f"AtomsBatch is missing {missing}; an atomistic batch needs {list(keys.ATOMS_KEYS)}.")
        self._tensors = dict(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"AtomsBatch has no {key!r}; it holds {sorted(self._tensors)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return int(self._tensors[keys.NUM_ATOMS].shape[0])

    @property
    def num_structures(self) -> int:
        return len(self)

    @property
    def num_atoms_total(self) -> int:
        return int(self._tensors[keys.POSITIONS].shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AtomsBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the floating-point entries."""
        moved = {}
        for key, value in self._tensors.items():
            target_dtype = dtype if dtype is not None and value.is_floating_point() else None
            moved[key] = value.to(device=device, dtype=target_dtype, non_blocking=True)
        return AtomsBatch(moved)

    def replace(self, **tensors: torch.Tensor) -> AtomsBatch:
        """A copy with some entries replaced (e.g. positions that require grad).

        New edges or shifts without a new ``num_edge_pairs`` drop the old one: the new list may not be paired.
        """
        merged = {**self._tensors, **tensors}
        if (keys.EDGE_INDEX in tensors or keys.CELL_SHIFTS in tensors) and keys.NUM_EDGE_PAIRS not in tensors:
            merged.pop(keys.NUM_EDGE_PAIRS, None)
        return AtomsBatch(merged)

    def __repr__(self) -> str:
        return (
            f"AtomsBatch(structures={len(self)}, atoms={self.num_atoms_total}, edges={self[keys.EDGE_INDEX].shape[1]})"
        )


def collate_atoms(items: Sequence[Mapping[str, torch.Tensor]]) -> AtomsBatch:
    """Concatenate per-structure dicts into one :class:`AtomsBatch`.

    Each item holds ``positions`` (n, 3), ``atomic_numbers`` (n,), ``cell`` (3, 3), ``pbc`` (3,),
    ``edge_index`` (2, e) with 0-based atom indices, ``cell_shifts`` (e, 3), and optionally
    ``energy`` () and ``forces`` (n, 3), ``stress`` (3, 3), ``site_energies`` (n,), Hessian rows
    (``hessian_row_coord``, ``hessian_rows``) and a ``metric_group`` () index (-1 for items without one).
    When every item's edges are ordered in reverse pairs (``num_edge_pairs``, as :func:`atoms_to_graph`
    makes them), so are the batch's: its first half is the items' first halves, its second half their
    second halves.
    """
    counts = torch.tensor([len(item[keys.ATOMIC_NUMBERS]) for item in items], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    edge_index = [item[keys.EDGE_INDEX] + off for item, off in zip(items, offsets.tolist())]
    cell_shifts = [item[keys.CELL_SHIFTS] for item in items]
    pairs = _edge_pairs(items)
    if pairs is not None:
        edge_index = [e[:, :half] for e, half in zip(edge_index, pairs)] + [
            e[:, half:] for e, half in zip(edge_index, pairs)
        ]
        cell_shifts = [s[:half] for s, half in zip(cell_shifts, pairs)] + [
            s[half:] for s, half in zip(cell_shifts, pairs)
        ]
    out: dict[str, torch.Tensor] = {
        keys.POSITIONS: torch.cat([item[keys.POSITIONS] for item in items]),
        keys.ATOMIC_NUMBERS: torch.cat([item[keys.ATOMIC_NUMBERS] for item in items]),
        keys.CELL: torch.stack([item[keys.CELL] for item in items]),
        keys.PBC: torch.stack([item[keys.PBC] for item in items]),
        keys.BATCH: torch.repeat_interleave(torch.arange(len(items)), counts),
        keys.NUM_ATOMS: counts,
        keys.EDGE_INDEX: torch.cat(edge_index, 1),
        keys.CELL_SHIFTS: torch.cat(cell_shifts),
    }
    if pairs is not None:
        out[keys.NUM_EDGE_PAIRS] = torch.tensor(pairs, dtype=torch.long)
    for key in keys.LABEL_KEYS:
        present = [key in item for item in items]
        if all(present):
            values = [item[key] for item in items]
            out[key] = torch.cat(values) if key in keys.PER_ATOM_LABEL_KEYS else torch.stack(values)
        elif any(present):
            raise KeyError(f"Some structures in the batch have {key!r} and others do not.")
    if any(keys.METRIC_GROUP in item for item in items):
        out[keys.METRIC_GROUP] = torch.tensor([int(item.get(keys.METRIC_GROUP, -1)) for item in items])
    out.update(_collate_hessian_rows(items, offsets))
    return AtomsBatch(out)


def _edge_pairs(items: Sequence[Mapping[str, torch.Tensor]]) -> list[int] | None:
    """Edge pairs of each item when every item's edges are paired, else None (the batch is left unpaired)."""
    if not all(keys.NUM_EDGE_PAIRS in item for item in items):
        return None
    pairs = []
    for number, item in enumerate(items):
        count, edges = int(item[keys.NUM_EDGE_PAIRS]), item[keys.EDGE_INDEX].shape[1]
        if 2 * count != edges:
            raise ValueError(
                f"Structure {number} of the batch has {edges} edges but {keys.NUM_EDGE_PAIRS}={count}; a paired "
                f"edge list has exactly 2 x {keys.NUM_EDGE_PAIRS} edges. Drop {keys.NUM_EDGE_PAIRS!r} from an "
                "edited edge list (atoms_to_graph pairs the edges it builds)."
            )
        pairs.append(count)
    return pairs


def _collate_hessian_rows(
    items: Sequence[Mapping[str, torch.Tensor]], atom_offsets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Hessian rows of the items (see ``keys.HESSIAN_KEYS``) re-indexed into the batch's flattened positions.

    Items without rows contribute none; a batch in which no item has rows gets no Hessian keys.
    """
    if not any(keys.HESSIAN_ROWS in item for item in items):
        return {}
    row_coords, values, entry_rows, entry_coords = [], [], [], []
    rows_so_far = 0
    for item, offset in zip(items, atom_offsets.tolist()):
        if keys.HESSIAN_ROWS not in item:
            continue
        rows = item[keys.HESSIAN_ROWS]  # (rows, 3n)
        count, width = rows.shape
        row_coords.append(item[keys.HESSIAN_ROW_COORD] + 3 * offset)
        values.append(rows.reshape(-1))
        entry_rows.append(torch.arange(rows_so_far, rows_so_far + count).repeat_interleave(width))
        entry_coords.append((torch.arange(width) + 3 * offset).repeat(count))
        rows_so_far += count
    return {
        keys.HESSIAN_ROW_COORD: torch.cat(row_coords),
        keys.HESSIAN_ROWS: torch.cat(values),
        keys.HESSIAN_ENTRY_ROW: torch.cat(entry_rows),
        keys.HESSIAN_ENTRY_COORD: torch.cat(entry_coords),
    }


def edge_vectors(
    batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None, cell: torch.Tensor | None = None
) -> torch.Tensor:
    """r_ij = x_j - x_i + S_ij @ cell for every edge; differentiable in ``positions`` and ``cell``."""
    positions = batch[keys.POSITIONS] if positions is None else positions
    cell = batch[keys.CELL] if cell is None else cell
    edge_index = batch[keys.EDGE_INDEX]
    i, j = edge_index[0], edge_index[1]
    # index_select rather than positions[j]: its backward is index_add_, where advanced indexing's
    # index_put_(accumulate=True) took ~12 % of a SchNet training step on the CPU.
    cell_of_edge = torch.index_select(cell, 0, torch.index_select(batch[keys.BATCH], 0, i))
    shifts = torch.einsum("ek,ekl->el", batch[keys.CELL_SHIFTS].to(positions.dtype), cell_of_edge.to(positions.dtype))
    return torch.index_select(positions, 0, j) - torch.index_select(positions, 0, i) + shifts


def as_plain_dict(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in batch}
