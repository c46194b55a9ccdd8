"""A student as one self-contained TorchScript file: loadable with ``torch.jit.load`` where ``mlff_distiller`` (or
ASE, or vesin) is not installed, e.g. by tools that take TorchScript force fields.

The file holds :class:`ExportedStudent`, scripted. Its interface (all tensors; Å, eV, eV/Å, eV/Å³):

* ``forward(data: Dict[str, Tensor]) -> Dict[str, Tensor]``: ``data`` holds ``positions`` (N, 3),
  ``atomic_numbers`` (N,) int64, ``cell`` (S, 3, 3) (rows are lattice vectors), ``pbc`` (S, 3) bool,
  ``edge_index`` (2, E) int64 and ``cell_shifts`` (E, 3): the full neighbour list (both i->j and j->i, every pair
  closer than ``cutoff``, r_ij = x_j - x_i + shifts @ cell), and for several systems ``batch`` (N,) and
  ``num_atoms`` (S,). Returns ``energy`` (S,), ``forces`` (N, 3) and ``stress`` (S, 3, 3) (ASE's sign, (1/V)
  dE/dstrain; dE/dstrain for a non-periodic system).
* ``compute(positions, atomic_numbers, cell, pbc)``: one system, with the module's own neighbour list
  (``neighbor_list``, all pairs and images: O(N² x images), meant for small systems; pass a list built by the
  host for large ones).
* attributes ``cutoff`` (Å), ``elements`` (atomic numbers it was trained on; others raise) and ``metadata``
  (JSON: cutoff, elements, units, dtype, model class, interface); the same JSON is the file's extra file
  ``metadata.json`` (``torch.jit.load(path, _extra_files={"metadata.json": ""})``).

Forces come from ``torch.autograd.grad`` inside the module: call it with grad mode on (the default), not under
``torch.no_grad()`` or inference mode.
"""

# No `from __future__ import annotations`: TorchScript reads this module's class annotations as types.
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__

UNITS = {
    "positions": "Å",
    "cell": "Å (rows are lattice vectors)",
    "energy": "eV",
    "forces": "eV/Å",
    "stress": "eV/Å³, ASE's sign: (1/V) dE/dstrain",
    "cutoff": "Å",
}


class ExportedStudent(nn.Module):
    """A student with its neighbour-list cutoff and element list, written so that TorchScript compiles it."""

    elements: list[int]
    cutoff: float
    metadata: str

    def __init__(self, model: nn.Module, metadata: str) -> None:
        super().__init__()
        self.model = model
        self.cutoff = float(model.cutoff)
        self.elements = [int(z) for z in model.elements]
        self.metadata = metadata
        known = torch.zeros(256, dtype=torch.bool)
        known[self.elements] = True
        if not self.elements:
            known[:] = True  # a student that records no elements accepts any
        self.register_buffer("known", known)

    def forward(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        numbers = data["atomic_numbers"]
        if bool((numbers < 0).any()) or bool((numbers > 255).any()) or not bool(self.known[numbers].all()):
            raise RuntimeError(
                "The structure contains elements the student was never trained on; it knows only " + str(self.elements)
            )
        batch = dict(data)
        positions = batch["positions"]
        if "batch" not in batch:
            batch["batch"] = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
            batch["num_atoms"] = torch.full([1], positions.shape[0], dtype=torch.long, device=positions.device)
        batch["cell"] = batch["cell"].reshape(-1, 3, 3).to(positions.dtype)
        batch["pbc"] = batch["pbc"].reshape(-1, 3)
        batch["cell_shifts"] = batch["cell_shifts"].to(positions.dtype)
        self.model.compute_stress = True
        out = self.model(batch)
        return {"energy": out["energy"].detach(), "forces": out["forces"].detach(), "stress": out["stress"].detach()}

    @torch.jit.export
    def neighbor_list(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair (i, j, S) closer than ``cutoff`` (both directions; a self pair only with S != 0), sorted by
        (i, j, S), as ``edge_index`` (2, E) and integer ``cell_shifts`` (E, 3)."""
        cell = cell.reshape(3, 3).to(positions.dtype)
        pbc = pbc.reshape(3)
        repeats: list[int] = []
        for k in range(3):
            if bool(pbc[k]):
                # Images needed along k: cutoff over the spacing of the lattice planes normal to k.
                spacing = torch.abs(torch.linalg.det(cell)) / torch.linalg.norm(
                    torch.linalg.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])
                )
                repeats.append(int(torch.ceil(self.cutoff / spacing)))
            else:
                repeats.append(0)
        axes = [torch.arange(-r, r + 1, device=positions.device) for r in repeats]
        grid = torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij")
        shifts = torch.stack([g.reshape(-1) for g in grid], dim=1)  # (M, 3), lexicographic
        n = positions.shape[0]
        offsets = shifts.to(positions.dtype) @ cell  # (M, 3)
        vectors = positions.view(1, n, 1, 3) - positions.view(n, 1, 1, 3) + offsets.view(1, 1, -1, 3)
        distances = torch.linalg.vector_norm(vectors, dim=-1)  # (N, N, M): [i, j, S]
        zero = (shifts == 0).all(dim=1)
        self_pair = torch.eye(n, dtype=torch.bool, device=positions.device).unsqueeze(-1) & zero.view(1, 1, -1)
        found = torch.nonzero((distances < self.cutoff) & ~self_pair)  # (E, 3): i, j, image
        return found[:, :2].t().contiguous(), shifts[found[:, 2]]

    @torch.jit.export
    def compute(
        self, positions: torch.Tensor, atomic_numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Energy, forces and stress of one system, with the module's own neighbour list."""
        edge_index, shifts = self.neighbor_list(positions, cell, pbc)
        data = {
            "positions": positions,
            "atomic_numbers": atomic_numbers,
            "cell": cell,
            "pbc": pbc,
            "edge_index": edge_index,
            "cell_shifts": shifts,
        }
        return self.forward(data)


def export_student(
    model: nn.Module, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, Any]:
    """Script ``model`` (a student; copied, never modified) in ``dtype`` and write it to ``path``; returns the
    metadata it records."""
    student = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    metadata = {
        "format": "mlff_distiller TorchScript student",
        "mlff_distiller_version": __version__,
        "model": type(model).__name__,
        "cutoff": float(student.cutoff),
        "elements": [int(z) for z in getattr(student, "elements", [])],
        "dtype": str(dtype).replace("torch.", ""),
        "units": UNITS,
        "interface": (
            "forward(data: Dict[str, Tensor]) with positions, atomic_numbers, cell, pbc, edge_index, cell_shifts "
            "[, batch, num_atoms] -> energy, forces, stress; compute(positions, atomic_numbers, cell, pbc); "
            "neighbor_list(positions, cell, pbc)"
        ),
    }
    text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False)
    scripted = torch.jit.script(ExportedStudent(student, text))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.jit.save(scripted, str(partial), _extra_files={"metadata.json": text})
    os.replace(partial, path)
    return metadata
