"""SchNet student: continuous-filter convolutions on interatomic distances (Schütt et al., 2017/2018)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import keys
from ..data.statistics import DatasetStatistics
from .base import AtomisticModel
from .common import (
    GaussianRBF,
    ShiftedSoftplus,
    append_isolated_atoms,
    check_sizes,
    edge_geometry,
    init_linear_,
    init_radial_,
    minus_isolated,
    mlp,
    pair_edges,
    scatter_sum,
    times_edge_filter,
)


class SchNetInteraction(nn.Module):
    """One interaction block: h_i += f2out( sum_j in2f(h)_j * W(r_ij) / avg_neighbours ).

    The filter network W(r) = Dense(ssp(Dense(rbf(r) * cosine_cutoff(r)))) has no biases and
    ssp(0) = 0, so W and its slope vanish at the cutoff; putting the envelope on the (E, num_rbf) basis
    instead of on the (E, hidden) filter saves edge-sized work in the double backward. ``rbf`` may
    hold one row per edge or, for paired edges, one per pair (see :class:`~.common.PairedEdges`).
    """

    def __init__(self, hidden: int, num_rbf: int) -> None:
        super().__init__()
        self.filter = nn.Sequential(
            nn.Linear(num_rbf, hidden, bias=False), ShiftedSoftplus(), nn.Linear(hidden, hidden, bias=False)
        )
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.f2out = mlp([hidden, hidden, hidden], "ssp")

    def forward(
        self, h: torch.Tensor, rbf: torch.Tensor, edge_index: torch.Tensor, avg_num_neighbors: torch.Tensor
    ) -> torch.Tensor:
        i, j = edge_index[0], edge_index[1]
        x = times_edge_filter(torch.index_select(self.in2f(h), 0, j), self.filter(rbf))  # (E, H)
        return h + self.f2out(scatter_sum(x, i, h.shape[0]) / avg_num_neighbors)


class SchNet(AtomisticModel):
    """SchNet: element embedding, ``interactions`` continuous-filter convolution blocks, per-atom MLP.

    * Distances are expanded in ``num_rbf`` Gaussians on [0, cutoff], multiplied by the cosine cutoff
      once per forward and shared by the (bias-free) filter networks of all blocks, so energy and
      forces are continuous as atoms cross the cutoff. Neighbour sums are divided by
      ``avg_num_neighbors``. An edge and its reverse share their filters (computed once per pair).
    * The per-atom output is the readout less that of an isolated atom of the same element (an
      extra edge-less node per element rides along through the blocks), so an atom without
      neighbours contributes exactly its reference energy from the dataset statistics.

    ``atomic_outputs`` returns these unscaled per-atom energies; :class:`AtomisticModel` scales them
    by the force RMS, adds the reference energies, sums and differentiates for forces.
    hidden=64, interactions=3, num_rbf=32, max_z=100 gives 64,256 parameters.
    """

    def __init__(
        self,
        cutoff: float = 5.0,
        hidden: int = 64,
        interactions: int = 3,
        num_rbf: int = 32,
        max_z: int = 100,
        statistics: DatasetStatistics | None = None,
        compute_stress: bool = False,
        compile: bool | str = False,
        zbl: bool = False,
    ) -> None:
        super().__init__(cutoff, statistics, compute_stress, compile, zbl)
        check_sizes(hidden, interactions, max_z)
        self.hidden = hidden
        self.max_z = max_z
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.rbf = GaussianRBF(num_rbf, cutoff)
        self.interactions = nn.ModuleList(SchNetInteraction(hidden, num_rbf) for _ in range(interactions))
        self.readout = mlp([hidden, hidden // 2, 1], "ssp", bias_last=False)  # a bias would cancel
        init_linear_(self)
        for block in self.interactions:
            init_radial_(block.filter[0])

    def atomic_outputs(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        numbers = batch[keys.ATOMIC_NUMBERS]
        edge_index, vectors, _ = pair_edges(batch, vectors)
        distances = torch.linalg.vector_norm(vectors, dim=-1)
        rbf = edge_geometry(distances, self.rbf(distances), self.cutoff).radial
        h = self.embedding(append_isolated_atoms(numbers, self.max_z))
        for block in self.interactions:
            h = block(h, rbf, edge_index, self.avg_num_neighbors)
        return minus_isolated(self.readout(h), numbers)
