"""`StudentCalculator`: a trained student as an ASE calculator (MD, relaxations, phonons...)."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn

from .data import keys
from .data.batch import collate_atoms
from .data.dataset import atoms_to_graph
from .memory import keep_freed_memory


class StudentCalculator(Calculator):
    """Energy and forces of a student model through ASE's calculator interface.

    ``StudentCalculator(model)`` wraps a model in memory; ``StudentCalculator.from_checkpoint(path)``
    rebuilds the student of any ``mlff-train`` run from its ``best_model.pt`` or ``last.pt``
    (EMA weights when the run kept them). Creating one calls :func:`~mlff_distiller.memory.keep_freed_memory`
    (the process keeps freed memory for reuse: large systems then cost no page faults per call).
    ``compile`` (true, "inductor", "fx" or false; None keeps the model's ``model.compile``) runs the
    student as one compiled graph: minutes to compile at the first call, then about 2x faster calls at
    32-256 atoms in our measurements (``benchmarks/README.md``), worth it for long MD runs.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        keep_freed_memory()  # repeated calls reuse their large tensors (no page faults; see memory.py)
        if not hasattr(model, "cutoff"):
            raise TypeError(
                f"{type(model).__name__} has no 'cutoff' attribute; StudentCalculator needs an "
                "atomistic student (e.g. SchNet, PaiNN)."
            )
        self.device = torch.device(device)
        self.dtype = dtype
        # A copy: the caller's model (maybe still training) keeps its dtype, mode and requires_grad.
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # only d/dpositions is needed
        if compile is not None and hasattr(self.model, "set_compile"):
            self.model.set_compile(compile)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", use_ema: bool = True, **kwargs: Any
    ) -> StudentCalculator:
        """Rebuild the model described in an ``mlff-train`` checkpoint and load its weights."""
        from hydra.utils import instantiate

        from .training.checkpoint import CheckpointError, load_checkpoint_file, load_model_weights

        state = load_checkpoint_file(path)
        model_config = state.get("config", {}).get("extra", {}).get("model_config")
        if model_config is None:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} does not describe its model (no model_config); it "
                "was not written by mlff-train. Build the model yourself and pass it to "
                "StudentCalculator(model)."
            )
        model = instantiate(model_config)
        load_model_weights(model, path, use_ema=use_ema)
        return cls(model, device=device, **kwargs)

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        graph = atoms_to_graph(self.atoms, self.model.cutoff, with_labels=False, dtype=self.dtype)
        batch = collate_atoms([graph]).to(self.device)
        periodic = bool(self.atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a periodic cell (pbc all True).")
        if hasattr(self.model, "compute_stress"):  # only pay for the strain derivative when asked
            self.model.compute_stress = "stress" in properties
        with torch.enable_grad():
            output = self.model(batch)
        energy = float(output[keys.ENERGY].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": output[keys.FORCES].detach().cpu().double().numpy(),
        }
        if keys.STRESS in output:
            s = output[keys.STRESS][0].detach().cpu().double().numpy()
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
