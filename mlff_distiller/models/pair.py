"""A pair-potential student: the energy is a sum over atom pairs of a learned function of distance."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import keys


class PairPotential(nn.Module):
    """E = sum_{i<j} MLP(r_ij) * cutoff(r_ij); forces = -dE/dx by autograd.

    Works on fixed-size clusters (positions of shape (structures, atoms, 3)); the graph is kept
    while training (``create_graph``) so a force loss trains the weights.
    """

    def __init__(self, hidden: int = 32, layers: int = 2, cutoff: float = 5.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        widths = [1] + [hidden] * layers
        blocks: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(w_in, w_out), nn.SiLU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(widths[-1], 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        positions = batch[keys.POSITIONS]
        if not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        n_atoms = positions.shape[-2]
        i, j = torch.triu_indices(n_atoms, n_atoms, offset=1, device=positions.device)
        r = (positions[..., i, :] - positions[..., j, :]).norm(dim=-1, keepdim=True)
        # Cosine envelope: energy and its derivative go smoothly to zero at the cutoff.
        envelope = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1) * (r < self.cutoff)
        energy = (self.mlp(r) * envelope).sum(dim=(-2, -1))
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
        return {keys.ENERGY: energy, keys.FORCES: -grad}
