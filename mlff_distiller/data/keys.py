"""The one place that names batch entries; a misspelled key fails loudly instead of reading zeros.

Atomistic batches concatenate the atoms of several structures (no padding); ``BATCH`` says which
structure each atom belongs to. Units: Å, eV, eV/Å.
"""

from typing import Any

POSITIONS = "positions"
"""Cartesian coordinates, Å; (atoms, 3) in atomistic batches, (structures, atoms, 3) for toy clusters."""
ATOMIC_NUMBERS = "atomic_numbers"
"""Element of each atom; (atoms,) int64."""
CELL = "cell"
"""Lattice vectors as rows, Å; (structures, 3, 3). Zero for non-periodic structures."""
PBC = "pbc"
"""Periodicity along each lattice vector; (structures, 3) bool."""
BATCH = "batch"
"""Index of the structure each atom belongs to; (atoms,) int64, sorted."""
NUM_ATOMS = "num_atoms"
"""Atoms per structure; (structures,) int64."""
EDGE_INDEX = "edge_index"
"""Directed neighbour pairs (i, j) within the cutoff, both directions present; (2, edges) int64."""
CELL_SHIFTS = "cell_shifts"
"""Integer lattice offsets S of each pair: r_ij = positions[j] - positions[i] + S @ cell; (edges, 3)."""
NUM_EDGE_PAIRS = "num_edge_pairs"
"""Edge pairs per structure; (structures,) int64, () in one structure's graph. Present only when the edge
list is ordered in reverse pairs: edge k + E/2 is edge k reversed (j -> i, shift -S), in a batch as in each
structure (the batch's first half is the structures' first halves), so the students need not sort the
edges to pair them. Set by ``atoms_to_graph``; ``AtomsBatch.replace`` drops it when the edges change."""
ENERGY = "energy"
"""Total energy per structure, eV; (structures,)."""
FORCES = "forces"
"""Forces on atoms, eV/Å; same shape as positions."""

STRESS = "stress"
"""Stress of periodic structures, eV/Å³, (structures, 3, 3); ASE's sign: (1/V) dE/dstrain."""
SITE_ENERGIES = "site_energies"
"""Per-atom (site) energies, eV; (atoms,). A structure's site energies sum to its energy. Students output
theirs (the per-atom terms they sum); labels come from teachers that expose a decomposition (EMT, CHGNet,
SevenNet). The decomposition is a gauge choice of each model, not an observable: see
:class:`~mlff_distiller.losses.energy_force.EnergyForceLoss` for what matching it means."""

METRIC_GROUP = "metric_group"
"""Group each structure is reported under (e.g. its ``config_type``): an index into the data's
``metric_groups`` names, -1 for a structure outside every group; (structures,) int64. Present only when the
data names a group key; losses report per-group metrics from it."""

ATOMS_KEYS = (POSITIONS, ATOMIC_NUMBERS, CELL, PBC, BATCH, NUM_ATOMS, EDGE_INDEX, CELL_SHIFTS)
LABEL_KEYS = (ENERGY, FORCES, STRESS, SITE_ENERGIES)
PER_ATOM_LABEL_KEYS = (FORCES, SITE_ENERGIES)
"""Labels with one entry per atom: batches concatenate them (the others are stacked per structure)."""

# Hessian rows (distillation labels): row c of the energy Hessian, H[c, :] = d^2E / dx_c dx, eV/Å², where
# c = 3 * atom + direction indexes a structure's flattened coordinates. A structure carries a few rows.
HESSIAN_ROW_COORD = "hessian_row_coord"
"""Coordinate index c of each Hessian row; (rows,) int64. Per structure: 0 <= c < 3n; in a batch: an index
into the batch's flattened positions (3 * batch atom + direction)."""
HESSIAN_ROWS = "hessian_rows"
"""Hessian row values, eV/Å². Per structure: (rows, 3n); in a batch: (entries,), every row over its own
structure's 3n coordinates, the rows one after another."""
HESSIAN_ENTRY_ROW = "hessian_entry_row"
"""Batches only: the row (index into ``hessian_row_coord``) of each entry of ``hessian_rows``; (entries,) int64."""
HESSIAN_ENTRY_COORD = "hessian_entry_coord"
"""Batches only: the column of each entry, an index into the batch's flattened positions; (entries,) int64."""

HESSIAN_KEYS = (HESSIAN_ROW_COORD, HESSIAN_ROWS, HESSIAN_ENTRY_ROW, HESSIAN_ENTRY_COORD)

# Where labelled extended-XYZ files keep Hessian rows (ASE round-trips both):
HESSIAN_ROW_INDEX_INFO = "hessian_row_index"
"""``atoms.info`` entry: the coordinate index c of each stored row; (rows,) int (a scalar when one row)."""
HESSIAN_ROWS_ARRAY = "hessian_rows"
"""``atoms.arrays`` entry, (n, 3 * rows): ``[a, 3 * k + d]`` = H[c_k, 3 * a + d], eV/Å²."""

# Where labelled extended-XYZ files keep the other teacher outputs and the labelling's provenance:
SITE_ENERGIES_ARRAY = "site_energies"
"""``atoms.arrays`` entry: the teacher's per-atom energies, (n,), eV; they sum to the structure's energy."""
SITE_ENERGY_SUM_TOLERANCE = 1e-5
"""eV/atom; site energies must sum to the structure's energy to this (file rounding is ~1e-8 eV per atom)."""
TEACHER_CALLS_INFO = "teacher_calls"
"""``atoms.info`` entry: teacher evaluations spent on the structure (int): its single point, 2 per
finite-difference Hessian row, 1 for an autograd pass (whose backward passes show only in the teacher's
CPU seconds, kept beside the file; see :func:`mlff_distiller.teachers.labelling.labelling_cost`)."""
HESSIAN_METHOD_INFO = "hessian_method"
"""``atoms.info`` entry of structures with Hessian rows: how they were computed, ``"fd"`` (central
differences of the teacher's forces), ``"autograd"`` (double backward through a torch teacher) or
``"calculator"`` (the teacher's own ``hessian_rows`` method)."""

TRAIN_ONLY = "train_only"
"""An ``atoms.info`` flag, not a batch entry: a structure with it true is never drawn into a validation or test
split, nor counted in the students' statistics (e.g. the sampler's contact copies, whose energies and forces lie
far outside what those measure); it is trained on unless ``DERIVED_FROM`` a held-out structure."""

DERIVED_FROM = "derived_from"
"""An ``atoms.info`` entry: the ``provenance`` of the structure this one was made from. A ``TRAIN_ONLY`` structure
derived from one that a drawn split holds out is not trained on (it is a near-twin of a validation or test one)."""


def is_train_only(atoms: Any) -> bool:
    """Whether a structure (anything with an ``info`` dict, e.g. ``ase.Atoms``) carries the ``TRAIN_ONLY`` flag."""
    return bool(atoms.info.get(TRAIN_ONLY, False))
