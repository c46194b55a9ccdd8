"""The one place that names batch entries; a misspelled key fails loudly instead of reading zeros.

Atomistic batches concatenate the atoms of several structures (no padding); ``BATCH`` says which
structure each atom belongs to. Units: Å, eV, eV/Å.
"""

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
ENERGY = "energy"
"""Total energy per structure, eV; (structures,)."""
FORCES = "forces"
"""Forces on atoms, eV/Å; same shape as positions."""

STRESS = "stress"
"""Stress of periodic structures, eV/Å³, (structures, 3, 3); ASE's sign: (1/V) dE/dstrain."""

ATOMS_KEYS = (POSITIONS, ATOMIC_NUMBERS, CELL, PBC, BATCH, NUM_ATOMS, EDGE_INDEX, CELL_SHIFTS)
LABEL_KEYS = (ENERGY, FORCES, STRESS)
