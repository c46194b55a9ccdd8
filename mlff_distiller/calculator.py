"""`StudentCalculator`: a trained student as an ASE calculator (MD, relaxations, phonons...)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn

from .md.potential import DEFAULT_SKIN, StudentPotential


class StudentCalculator(Calculator):
    """Energy, forces and stress of a student model through ASE's calculator interface.

    ``StudentCalculator(model)`` wraps a model in memory; ``StudentCalculator.from_checkpoint(path)``
    rebuilds the student of any ``mlff-train`` run from its ``best_model.pt`` or ``last.pt`` (or a run
    directory; EMA weights when the run kept them). It calls the student through
    :class:`~mlff_distiller.md.potential.StudentPotential`, which reuses neighbour lists within a ``skin``
    (Å) as MD moves the atoms. A structure with an element the student was not trained on raises
    :class:`~mlff_distiller.models.base.UnknownElementError`.

    Its potential calls :func:`~mlff_distiller.memory.keep_freed_memory` (the process keeps freed memory for
    reuse: large systems then cost no page faults per call). ``compile`` (true, "inductor", "fx" or false;
    None keeps the model's ``model.compile``) runs the student as one compiled graph: minutes to compile at
    the first call, then about 2x faster calls at 32-256 atoms in our measurements (``benchmarks/README.md``),
    worth it for long MD runs.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: nn.Module | StudentPotential,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        skin: float = DEFAULT_SKIN,
        compile: bool | str | None = None,
        **kwargs: Any,
    ) -> None:
        """``model``: a student (copied), or a :class:`StudentPotential` to share (used as it is)."""
        super().__init__(**kwargs)
        if isinstance(model, StudentPotential):
            self.potential = model
        else:
            self.potential = StudentPotential(model, device=device, dtype=dtype, skin=skin)
        if compile is not None and hasattr(self.potential.model, "set_compile"):
            self.potential.model.set_compile(compile)

    @property
    def model(self) -> nn.Module:
        """The calculator's own (frozen, eval-mode) copy of the student."""
        return self.potential.model

    @property
    def device(self) -> torch.device:
        return self.potential.device

    @property
    def dtype(self) -> torch.dtype:
        return self.potential.dtype

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", use_ema: bool = True, **kwargs: Any
    ) -> StudentCalculator:
        """Rebuild the model described in an ``mlff-train`` checkpoint and load its weights."""
        from .evaluation import load_student

        return cls(load_student(path, use_ema=use_ema).model, device=device, **kwargs)

    def check_state(self, atoms: Any, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation, compared exactly: ASE's generic comparison (every array
        with ``allclose``) costs about as much as a small student's call."""
        if self.atoms is None:
            return list(all_changes)
        old, changes = self.atoms, []
        if not np.array_equal(old.positions, atoms.positions):
            changes.append("positions")
        if not np.array_equal(old.numbers, atoms.numbers):
            changes.append("numbers")
        if not np.array_equal(old.cell.array, atoms.cell.array):
            changes.append("cell")
        if not np.array_equal(old.pbc, atoms.pbc):
            changes.append("pbc")
        return changes

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        stress = "stress" in properties
        if stress and not self.atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a periodic cell (pbc all True).")
        self.results = self.potential.compute_atoms(self.atoms, stress=stress)  # stress only when asked
        self.results["free_energy"] = self.results["energy"]
