"""PaiNN student: equivariant message passing with scalar and vector features (Schütt et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import keys
from ..data.statistics import DatasetStatistics
from .base import AtomisticModel
from .common import (
    BesselRBF,
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

VECTOR_NORM_EPS = 1e-4
"""||V v|| is evaluated as sqrt(|V v|² + eps): smooth at zero (where vectors cancel by symmetry), with
second derivatives bounded by 1/sqrt(eps), so force constants stay finite in symmetric crystals."""


class PaiNNMessage(nn.Module):
    """Message block: neighbours j send scalar and vector updates to atom i.

    With (phi_s, phi_vs, phi_vv) = MLP(s_j) and filters W_*(r_ij) linear in the (cut-off) radial basis:
    ds_i = sum_j phi_s_j W_s(r_ij),
    dv_i = sum_j v_j phi_vv_j W_vv(r_ij) + u_ij phi_vs_j W_vs(r_ij)  (u_ij = r_ij / |r_ij|),
    both divided by the average neighbour count. The three parts are kept as separate (E, H) tensors
    (no split of an (E, 3H) one) and v_j * phi_vv_j is formed per atom before the gather: both save
    edge-sized work in the double backward. ``rbf`` may hold one row per edge or, for paired edges,
    one per pair (see :class:`~.common.PairedEdges`); ``units`` always has one row per edge.
    """

    def __init__(self, hidden: int, num_rbf: int, first: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        parts = 2 if first else 3  # v = 0 before the first block: no v_j term, so no phi_vv / W_vv there
        self.phi = mlp([hidden, hidden, parts * hidden], "silu")
        self.filter_s = nn.Linear(num_rbf, hidden, bias=False)
        self.filter_vs = nn.Linear(num_rbf, hidden, bias=False)
        self.filter_vv = None if first else nn.Linear(num_rbf, hidden, bias=False)

    def forward(
        self,
        s: torch.Tensor,
        v: torch.Tensor | None,
        rbf: torch.Tensor,
        units: torch.Tensor,
        edge_index: torch.Tensor,
        avg_num_neighbors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``v`` is None for the first block; returns the updated (s, v)."""
        i, j = edge_index[0], edge_index[1]
        n = s.shape[0]
        phi = self.phi(s).split(self.hidden, dim=-1)
        ds = times_edge_filter(torch.index_select(phi[0], 0, j), self.filter_s(rbf))  # (E, H)
        dvs = times_edge_filter(torch.index_select(phi[1], 0, j), self.filter_vs(rbf))  # (E, H)
        dv = units.unsqueeze(-1) * dvs.unsqueeze(1)  # (E, 3, H)
        if self.filter_vv is not None:
            if v is None:
                raise ValueError("Only the first PaiNN message block can start without vector features.")
            gathered = torch.index_select(v * phi[2].unsqueeze(1), 0, j)  # (E, 3, H)
            filter_vv = self.filter_vv(rbf)
            if filter_vv.shape[0] != gathered.shape[0]:  # paired edges: an (E, 3, H) product is faster unbroadcast
                filter_vv = torch.cat([filter_vv, filter_vv])
            dv = torch.addcmul(dv, gathered, filter_vv.unsqueeze(1))
        s = s + scatter_sum(ds, i, n) / avg_num_neighbors
        dv = scatter_sum(dv, i, n) / avg_num_neighbors
        return s, dv if v is None else v + dv


class PaiNNUpdate(nn.Module):
    """Update block: mixes channels within each atom.

    (Uv, Vv) = linear maps of v over channels; (avv, asv, ass) = MLP([s, ||Vv||]);
    v += avv * Uv,  s += asv * <Uv, Vv> + ass.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.eps = VECTOR_NORM_EPS  # an attribute: TorchScript cannot read module-level floats
        self.uv = nn.Linear(hidden, 2 * hidden, bias=False)  # U and V stacked
        self.mlp = mlp([2 * hidden, hidden, 3 * hidden], "silu")

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u_v, v_v = self.uv(v).split(self.hidden, dim=-1)  # (N, 3, H) each
        norm = torch.sqrt(v_v.pow(2).sum(1) + self.eps)
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, norm], dim=-1)).split(self.hidden, dim=-1)
        v = torch.addcmul(v, u_v, a_vv.unsqueeze(1))
        s = s + (u_v * v_v).sum(1) * a_sv + a_ss
        return s, v


class PaiNN(AtomisticModel):
    """PaiNN: scalar features s (atoms, H) and vector features v (atoms, 3, H), rotation-equivariant.

    * Distances are expanded in ``num_rbf`` sine (Bessel) functions, multiplied by the cosine cutoff
      once per forward; the filters are bias-free linear maps of that basis, so every message
      vanishes with zero slope at the cutoff. An edge and its reverse share their filters.
    * Each of the ``interactions`` blocks is a message (over ``edge_index``, sums divided by
      ``avg_num_neighbors``) followed by an update; the energy is read out from s only.
    * The per-atom output is the readout less that of an isolated atom of the same element (an
      extra edge-less node per element rides along through the blocks), so an atom without
      neighbours contributes exactly its reference energy.

    hidden=64, interactions=3, num_rbf=20, max_z=100 gives 151,360 parameters.
    """

    def __init__(
        self,
        cutoff: float = 5.0,
        hidden: int = 64,
        interactions: int = 3,
        num_rbf: int = 20,
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
        self.rbf = BesselRBF(num_rbf, cutoff)
        self.messages = nn.ModuleList(PaiNNMessage(hidden, num_rbf, first=k == 0) for k in range(interactions))
        self.updates = nn.ModuleList(PaiNNUpdate(hidden) for _ in range(interactions))
        self.readout = mlp([hidden, hidden // 2, 1], "silu", bias_last=False)  # a bias would cancel
        init_linear_(self)
        for message in self.messages:
            for layer in (message.filter_s, message.filter_vs, message.filter_vv):
                if layer is not None:
                    init_radial_(layer)

    def atomic_outputs(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        numbers = batch[keys.ATOMIC_NUMBERS]
        edge_index, vectors, paired = pair_edges(batch, vectors)
        distances = torch.linalg.vector_norm(vectors, dim=-1)
        geometry = edge_geometry(distances, self.rbf(distances), self.cutoff)
        units = vectors / geometry.distances.unsqueeze(-1)
        if paired:  # the reversed edges point the other way
            units = torch.cat([units, -units])
        rbf = geometry.radial
        s, v = self.embedding(append_isolated_atoms(numbers, self.max_z)), None
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, rbf, units, edge_index, self.avg_num_neighbors)
            s, v = update(s, v)
        return minus_isolated(self.readout(s), numbers)
