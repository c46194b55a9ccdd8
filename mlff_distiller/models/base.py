"""What every atomistic student shares: energy = sum of per-atom terms, forces = -dE/dx.

A subclass implements :meth:`AtomisticModel.atomic_outputs`: one scalar per atom from the atomic
numbers and the edge vectors. This class scales and shifts it by the dataset statistics, adds the
per-element reference energies, sums per structure and differentiates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import keys
from ..data.batch import edge_vectors
from ..data.statistics import DatasetStatistics
from .compiled import CompiledForward, compile_mode
from .repulsion import ZBLRepulsion

MAX_Z = 100


class UnknownElementError(ValueError):
    """A structure holds an element the student was never trained on; its answer would be meaningless."""


class AtomisticModel(nn.Module):
    """Base class of the students. ``forward(batch) -> {"energy": (S,), "forces": (N, 3), "site_energies": (N,)}``.

    ``site_energies`` are the per-atom terms the energy is the sum of (eV), reference energies included.

    With ``compute_stress`` the output also holds ``"stress"`` (S, 3, 3), eV/Å³, for periodic cells.
    ``statistics`` (optional) sets the buffers ``atomic_energies`` (eV per element), ``scale``
    (eV, force RMS), ``avg_num_neighbors`` and ``trained_elements`` (which atomic numbers the training data
    held); they are saved in the state dict, so a model rebuilt without statistics and loaded from a
    checkpoint gets them back. :meth:`check_elements` refuses structures with other elements.
    ``compile`` (false, true or "inductor", "fx") runs energy, forces and stress as one traced graph, so
    that a force loss needs only a first-order backward (see :mod:`~mlff_distiller.models.compiled`).
    ``zbl`` adds a screened nuclear repulsion to the energy (:class:`~.repulsion.ZBLRepulsion`, pairs closer
    than the sum of their covalent radii): the network then learns the rest, and its extrapolation cannot pull
    two atoms inside those radii.
    """

    def __init__(
        self,
        cutoff: float,
        statistics: DatasetStatistics | None = None,
        compute_stress: bool = False,
        compile: bool | str = False,
        zbl: bool = False,
    ) -> None:
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"cutoff={cutoff} must be > 0 (Å).")
        self.cutoff = float(cutoff)
        self.compute_stress = compute_stress
        self.compiled: CompiledForward | None = None
        self.set_compile(compile)
        self.zbl = ZBLRepulsion(MAX_Z) if zbl else None
        self.register_buffer("atomic_energies", torch.zeros(MAX_Z + 1))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("avg_num_neighbors", torch.tensor(1.0))
        self.register_buffer("trained_elements", torch.zeros(MAX_Z + 1, dtype=torch.bool))
        self._register_load_state_dict_pre_hook(_infer_trained_elements)
        if statistics is not None:
            self.set_statistics(statistics)

    def set_compile(self, compile: bool | str) -> None:
        """Switch the compiled path on (true, "inductor", "fx") or off (false); graphs are traced on first use."""
        mode = compile_mode(compile)
        # Not a submodule and not in the state dict: compiled and eager models load each other's checkpoints.
        self.compiled = CompiledForward(mode) if mode != "none" else None

    def set_statistics(self, statistics: DatasetStatistics) -> None:
        with torch.no_grad():
            self.atomic_energies.zero_()
            for z, energy in statistics.atomic_energies.items():
                self.atomic_energies[int(z)] = energy
            # A floor keeps a set of relaxed structures (force RMS ~ 0) from silencing the model.
            self.scale.fill_(max(statistics.force_rms, 1e-3))
            self.avg_num_neighbors.fill_(max(statistics.avg_num_neighbors, 1.0))
            self.trained_elements.zero_()
            for z in statistics.atomic_energies:
                self.trained_elements[int(z)] = True

    @property
    def elements(self) -> list[int]:
        """Atomic numbers the student was trained on (empty for a model never given statistics)."""
        return torch.nonzero(self.trained_elements).flatten().tolist()

    def check_elements(self, numbers: Any, where: str = "the structure") -> None:
        """Raise :class:`UnknownElementError` when ``numbers`` (atomic numbers) hold an element the student was
        not trained on. A model that records no elements (built without statistics) accepts any."""
        known = self.elements
        if not known:
            return
        present = np.unique(np.asarray(numbers.cpu() if torch.is_tensor(numbers) else numbers, dtype=np.int64))
        unknown = [int(z) for z in present if z < 0 or z > MAX_Z or not bool(self.trained_elements[int(z)])]
        if unknown:
            from ase.data import chemical_symbols

            def names(zs: list[int]) -> str:
                return ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}" for z in zs)

            raise UnknownElementError(
                f"{where} contains {names(unknown)}, which the student was never trained on; it knows only "
                f"{names(known)}. Its energies and forces there would be meaningless: train (or distil) a student "
                "on data that contains these elements."
            )

    def atomic_outputs(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        """Unscaled per-atom energies, shape (atoms,); ``vectors`` are the edge vectors r_ij."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``: any mapping of batch keys (a dict under TorchScript)."""
        if torch.jit.is_scripting():
            # TorchScript has no enable_grad: a scripted student must be called with grad mode on (the default).
            return self._energy_and_forces(batch)
        else:
            if self.compiled is not None:
                out = self.compiled(self, batch)
                if out is not None:
                    return out
            return self.eager_forward(batch)

    @torch.jit.unused
    def eager_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``forward`` without the compiled graph (what the graph is traced from and checked against)."""
        with torch.enable_grad():  # forces need autograd, also when called under torch.no_grad()
            return self._energy_and_forces(batch)

    def _edge_vectors(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Edge vectors, and with ``compute_stress`` the zero strain they are deformed by (else None)."""
        if not self.compute_stress:
            return edge_vectors(batch, positions), None
        # Stress = (1/V) dE/d(strain): deform positions and cell by a symmetric strain at zero.
        strain = torch.zeros_like(cell).requires_grad_(True)
        symmetric = 0.5 * (strain + strain.transpose(1, 2))
        deformed = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch[keys.BATCH]])
        return edge_vectors(batch, deformed, cell + torch.bmm(cell, symmetric)), strain

    def _energy_and_forces(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        positions = batch[keys.POSITIONS]
        # Positions that already require grad mean the caller differentiates the forces again (Hessian
        # rows, also in validation where the model is in eval mode): the force graph must then be kept.
        higher_derivatives = positions.requires_grad
        if not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        inputs = [positions]
        cell = batch[keys.CELL].to(positions.dtype)
        if torch.jit.is_scripting():
            vectors, strain = self._edge_vectors(batch, positions, cell)
        else:
            # Geometry stays in full precision under autocast: a bf16 cell shift is off by ~0.02 Å.
            with torch.autocast(device_type=positions.device.type, enabled=False):
                vectors, strain = self._edge_vectors(batch, positions, cell)
        if strain is not None:
            inputs.append(strain)
        # Reduced in the precision of the positions (float32/64), never in half precision.
        per_atom = self.atomic_outputs(batch, vectors).to(positions.dtype) * self.scale
        per_atom = per_atom + self.atomic_energies[batch[keys.ATOMIC_NUMBERS]]
        if self.zbl is not None:
            per_atom = per_atom + self.zbl(
                batch[keys.ATOMIC_NUMBERS], batch[keys.EDGE_INDEX], torch.linalg.vector_norm(vectors, dim=-1)
            )
        num_structures = batch[keys.NUM_ATOMS].shape[0]
        energy = torch.zeros(num_structures, dtype=per_atom.dtype, device=per_atom.device)
        energy = energy.index_add(0, batch[keys.BATCH], per_atom)
        # create_graph while training so that a force loss reaches the weights.
        gradients = torch.autograd.grad([energy.sum()], inputs, create_graph=self.training or higher_derivatives)
        position_gradient = gradients[0]
        assert position_gradient is not None  # refines Optional[Tensor] for TorchScript; never fails
        # The per-atom terms are already there: exposing them costs nothing and changes no other output.
        out = {keys.ENERGY: energy, keys.FORCES: -position_gradient, keys.SITE_ENERGIES: per_atom}
        if self.compute_stress:
            strain_gradient = gradients[1]
            assert strain_gradient is not None
            volume = torch.linalg.det(cell).abs()
            volume = torch.where(volume > 0, volume, torch.ones_like(volume))  # non-periodic: stress is dE/dstrain
            out[keys.STRESS] = strain_gradient / volume[:, None, None]
        return out


def _infer_trained_elements(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Checkpoints written before trained_elements existed: the elements are those with a fitted reference
    # energy (a least-squares fit gives a non-zero value to every element present in the training data).
    key, energies = f"{prefix}trained_elements", state_dict.get(f"{prefix}atomic_energies")
    if key not in state_dict and energies is not None:
        state_dict[key] = energies != 0


def cosine_cutoff(distances: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smooth envelope: 1 at r=0, 0 with zero slope at r=cutoff (and beyond)."""
    return 0.5 * (torch.cos(torch.pi * distances / cutoff) + 1.0) * (distances < cutoff)
