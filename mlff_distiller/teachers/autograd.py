"""Hessian rows of torch teachers by double backward, for the teachers whose models allow it.

Both CHGNet and SevenNet compute forces as ``-dE/dx`` with ``torch.autograd.grad`` inside the model; what
they return to ASE is detached. Here the same model is run on the same graph with the force graph kept, and
row c of the Hessian is ``-dF_c/dx``: one forward pass and one backward pass per row (a batched,
vmapped backward over several rows was measured slower for both models on CPU, so rows are taken one by
one). The neighbour list is the one the calculator builds at the structure, as for its own forces.

- CHGNet (0.4): its public ``CHGNet.forward`` already keeps the force graph (``create_graph=True``). Its
  positions are fractional coordinates times the lattice, both leaves, so the rows are taken with
  respect to the fractional coordinates and mapped back: ``dF/dx = dF/ds @ inv(L).T``.
- SevenNet (0.13): the model differentiates with respect to the edge vectors, precomputed in numpy, and
  keeps no graph in eval mode. The edge vectors are rebuilt as a differentiable function of the
  positions (same edges, same periodic shifts), and the model's force module alone is put in training
  mode for the pass (that only switches on ``create_graph``), then restored.

Compared with central finite differences of the forces (``delta`` = 0.01 Å, 2 teacher calls per row), the
rows agree to O(delta²) on smooth parts of the energy; finite differences are off by much more where a
pair sits within ``delta`` of the teacher's cutoff (the neighbour list changes between the two calls),
which autograd does not see. ``tests/teachers/test_autograd_hessian.py`` holds the comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .calculators import derives_from

if TYPE_CHECKING:
    import torch
    from ase import Atoms

RowsFunction = Callable[["Atoms", Sequence[int]], np.ndarray]
"""``rows(atoms, coords) -> (len(coords), 3n)`` Hessian rows, eV/Å²."""


def autograd_rows_function(calculator: Any) -> RowsFunction | None:
    """A function computing ``calculator``'s Hessian rows by autograd, or None when this module does not
    know how for that calculator (CHGNet's and SevenNet's ASE calculators, and subclasses, are known)."""
    if derives_from(calculator, "chgnet.model.dynamics.CHGNetCalculator"):
        return lambda atoms, coords: chgnet_hessian_rows(calculator, atoms, coords)
    if derives_from(calculator, "sevenn.calculator.SevenNetCalculator"):
        return lambda atoms, coords: sevenn_hessian_rows(calculator, atoms, coords)
    return None


def _rows(forces: torch.Tensor, variable: torch.Tensor, coords: Sequence[int]) -> list[torch.Tensor]:
    """``-dF_c/d(variable)`` for each coordinate c, one backward pass each."""
    import torch

    flat = forces.reshape(-1)
    return [-torch.autograd.grad(flat[int(c)], variable, retain_graph=True)[0] for c in coords]


def chgnet_hessian_rows(calculator: Any, atoms: Atoms, coords: Sequence[int]) -> np.ndarray:
    """Rows ``coords`` of the Hessian of a ``CHGNetCalculator``'s energy at ``atoms``; (rows, 3n), eV/Å²."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    model = calculator.model
    graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms)).to(calculator.device)
    model.eval()
    with torch.enable_grad():
        prediction = model([graph], task="ef")
        fractional = graph.atom_frac_coord
        if not fractional.requires_grad:
            raise RuntimeError(
                "CHGNet's graph does not track its fractional coordinates (changed chgnet version?); "
                "use hessian_method=fd for this teacher."
            )
        rows = _rows(prediction["f"][0], fractional, coords)
    if not rows:
        return np.zeros((0, 3 * len(atoms)))
    to_cartesian = torch.linalg.inv(graph.lattice.detach()).T
    return np.stack([(row @ to_cartesian).reshape(-1).detach().double().cpu().numpy() for row in rows])


@contextlib.contextmanager
def _force_graph_kept(module: Any) -> Iterator[None]:
    """SevenNet's force modules pass ``create_graph=self.training``: training mode for this one module."""
    was_training = module.training
    module.training = True
    try:
        yield
    finally:
        module.training = was_training


def sevenn_hessian_rows(calculator: Any, atoms: Atoms, coords: Sequence[int]) -> np.ndarray:
    """Rows ``coords`` of the Hessian of a ``SevenNetCalculator``'s energy at ``atoms``; (rows, 3n), eV/Å²."""
    import sevenn._keys as KEY
    import torch
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    model = calculator.model
    force_module = model._modules.get("force_output")
    if force_module is None or getattr(model, "key_grad", None) != KEY.EDGE_VEC:
        raise RuntimeError(
            f"This SevenNet model (gradient key {getattr(model, 'key_grad', None)!r}, force module "
            f"{type(force_module).__name__}) is not the edge-vector kind these rows are written for; use "
            "hessian_method=fd for this teacher."
        )
    data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, calculator.cutoff, with_shift=False))
    if calculator.modal:
        data[KEY.DATA_MODALITY] = calculator.modal
    data.to(calculator.device)
    with torch.enable_grad(), _force_graph_kept(force_module):
        positions = data[KEY.POS].detach().clone().requires_grad_(True)
        source, target = data[KEY.EDGE_IDX]
        # Periodic image offsets, constant: the edge vectors minus the in-cell separations.
        shifts = data[KEY.EDGE_VEC].detach() - (positions.detach()[target] - positions.detach()[source])
        data[KEY.EDGE_VEC] = positions[target] - positions[source] + shifts
        output = model(data)
        rows = _rows(output[KEY.PRED_FORCE][: len(atoms)], positions, coords)
    if not rows:
        return np.zeros((0, 3 * len(atoms)))
    return np.stack([row.reshape(-1).detach().double().cpu().numpy() for row in rows])
