"""The one place that names batch entries; a misspelled key fails loudly instead of reading zeros."""

POSITIONS = "positions"
"""Cartesian coordinates, Å; shape (..., atoms, 3)."""
ENERGY = "energy"
"""Total energy per structure, eV; shape (structures,)."""
FORCES = "forces"
"""Forces on atoms, eV/Å; same shape as positions."""
