"""Running students where molecular dynamics runs: one batched interface (:class:`StudentPotential`), engine
adapters (ASE, LAMMPS, i-PI, OpenMM, torch-sim) behind one MD driver (:func:`run_md`), unstable-MD detection in
one place, and TorchScript export.

Imports nothing heavy at package level; the engines import their packages only when used.
"""
