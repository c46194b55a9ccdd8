"""Pieces the message-passing students share: radial bases, activations, scatter-sum, edge geometry,
and the pairing of each edge i -> j with its reverse j -> i (whose distance and filters are the same).

Plain PyTorch only (``index_add``; no torch_scatter / PyG), so every op here has a double
backward: the force loss differentiates through ``forces = -dE/dx``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..data import keys
from .base import cosine_cutoff

_LOG2 = math.log(2.0)


class ShiftedSoftplus(nn.Module):
    """ssp(x) = softplus(x) - log 2: smooth, ssp(0) = 0 (SchNet's activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = _LOG2  # an attribute: TorchScript cannot read module-level floats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x) - self.shift


ACTIVATIONS = {"ssp": ShiftedSoftplus, "shifted_softplus": ShiftedSoftplus, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name: ``"ssp"`` (shifted softplus) or ``"silu"``."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"activation={name!r} is unknown; accepted: {', '.join(sorted(ACTIVATIONS))}.") from None


def mlp(sizes: list[int], act: str, bias_last: bool = True) -> nn.Sequential:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for k, (w_in, w_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = k == len(sizes) - 2
        layers.append(nn.Linear(w_in, w_out, bias=bias_last or not last))
        if not last:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """``out[index[e]] += src[e]`` along dim 0; ``out`` has ``dim_size`` rows and ``src``'s dtype."""
    out = src.new_zeros([dim_size] + list(src.shape[1:]))
    return out.index_add_(0, index, src)


GAUSSIAN_EXPONENT_FLOOR = -50.0
"""Gaussians are exactly 0 where their exponent is below this (values under e^-50 ~ 2e-22, a jump no
float32 or float64 sum resolves): their tails would otherwise be denormal floats (below 1e-38 in float32),
and CPU arithmetic on denormals is 10-100x slower; they made a SchNet training step 2x slower."""


class GaussianRBF(nn.Module):
    """pi^(-1/4) exp(-(r - mu_k)² / (2 w²)): ``num_rbf`` centres mu_k evenly spaced on [0, cutoff], w = spacing.

    The prefactor makes |rbf(r)|² = sum_k rbf_k(r)² close to 1 for every r inside the grid. Each
    Gaussian is cut to 0 beyond ~7 widths from its centre (:data:`GAUSSIAN_EXPONENT_FLOOR`).
    """

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        if num_rbf < 2:
            raise ValueError(f"num_rbf={num_rbf} must be >= 2.")
        centers = torch.linspace(0.0, cutoff, num_rbf)
        width = float(centers[1] - centers[0])
        self.register_buffer("centers", centers, persistent=False)
        self.coefficient = -0.5 / width**2
        self.log_prefactor = -0.25 * math.log(math.pi)
        self.exponent_floor = GAUSSIAN_EXPONENT_FLOOR  # an attribute: TorchScript cannot read module-level numbers

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        exponent = self.coefficient * (distances.unsqueeze(-1) - self.centers) ** 2
        # Clamped before exp too: exp's backward multiplies by its output, which must not be denormal.
        inside = exponent > self.exponent_floor
        gaussians = torch.exp(exponent.clamp(min=self.exponent_floor) + self.log_prefactor)
        return torch.where(inside, gaussians, torch.zeros_like(gaussians))


class BesselRBF(nn.Module):
    """sqrt(2/c) sin(n pi r / c) / r for n = 1..num_rbf (c: cutoff); finite at r -> 0."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        if num_rbf < 1:
            raise ValueError(f"num_rbf={num_rbf} must be >= 1.")
        self.register_buffer("frequencies", torch.arange(1, num_rbf + 1) * (math.pi / cutoff), persistent=False)
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        r = distances.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies * r) / r


class EdgeGeometry(NamedTuple):
    """Per-edge quantities computed once per forward and shared by every interaction block."""

    distances: torch.Tensor
    """|r_ij|, (E,)."""
    radial: torch.Tensor
    """Radial basis times the cosine cutoff, (E, num_rbf): zero with zero slope at the cutoff."""


def edge_geometry(distances: torch.Tensor, basis: torch.Tensor, cutoff: float) -> EdgeGeometry:
    """Distances and cut-off radial basis of the edge vectors ``(E, 3)``.

    The envelope multiplies the narrow basis rather than the wide filters built from it; with
    bias-free filter networks whose activation maps 0 to 0 that is equally smooth and cheaper.
    """
    return EdgeGeometry(distances, basis * cosine_cutoff(distances, cutoff).unsqueeze(-1))


SHIFT_BASE = 256
"""Cell shifts are encoded as one integer in base 256 (each component must lie in (-128, 128))."""
MAX_PAIRED_ATOMS = 741_000
"""Above this many atoms an edge's integer key, (i * atoms + j) * 256³ + shift code, could overflow int64."""


class PairedEdges(NamedTuple):
    """A full neighbour list reordered so that the edges in its second half reverse those in its first.

    Edge ``k + E/2`` of ``edge_index`` is edge ``k`` reversed (j -> i with the opposite cell shift),
    so it has the same distance: functions of the distance (radial basis, filters) are computed for
    the first half only and shared by both halves (:func:`times_edge_filter`). In the double backward
    of a force loss that halves the cost of the filter networks, most of a training step.
    """

    edge_index: torch.Tensor
    """(2, E), the reordered edges."""
    vectors: torch.Tensor
    """(E/2, 3), r_ij of the first half; the second half's are their negatives. All E when ``paired`` is False."""
    paired: bool
    """False when the list is not a full list (an edge without its reverse): then nothing is shared."""


def pair_edges(batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> PairedEdges:
    """Pair every edge of ``batch`` with its reverse; ``vectors`` are the batch's edge vectors (E, 3).

    Batches from the data pipeline come paired (``keys.NUM_EDGE_PAIRS``): their order is used as it is,
    checked on the device without a host sync. Other edge lists are paired here: an edge (i, j, S) is
    kept in the first half when i < j, or i == j and the shift S is lexicographically positive (a
    periodic self-image); its reverse (j, i, -S) is found by sorting integer keys. That pairing is
    checked exactly (one host sync, on the integer edge list); when it fails, e.g. for a half list or a
    hand-made edge list, the edges are returned unpaired and unchanged.
    """
    edge_index = batch[keys.EDGE_INDEX]
    num_edges = edge_index.shape[1]
    if keys.NUM_EDGE_PAIRS in batch:
        return _pipeline_pairs(edge_index, batch[keys.CELL_SHIFTS], vectors)
    num_atoms = batch[keys.POSITIONS].shape[0]
    unpaired = PairedEdges(edge_index, vectors, False)
    # Literals below are SHIFT_BASE (256) and MAX_PAIRED_ATOMS: TorchScript cannot read module-level numbers.
    if num_edges == 0 or num_edges % 2 or num_atoms > 741_000:
        return unpaired
    # Integer work only (no gradients flow through it).
    shifts = batch[keys.CELL_SHIFTS].round().to(torch.int64)
    code = (shifts[:, 0] * 256 + shifts[:, 1]) * 256 + shifts[:, 2]  # sign: lexicographic
    i, j = edge_index[0], edge_index[1]
    first = (i < j) | ((i == j) & (code > 0))
    half = num_edges // 2
    forward = torch.sort((~first).to(torch.uint8), stable=True).indices[:half]
    offset = 256 * 256 * 256
    keys_sorted, order = torch.sort((i * num_atoms + j) * offset + code)
    reverse_keys = (j[forward] * num_atoms + i[forward]) * offset - code[forward]
    reverse = order[torch.searchsorted(keys_sorted, reverse_keys).clamp_(max=num_edges - 1)]
    ok = (
        first[forward].all()
        & (shifts.abs() < 128).all()
        & (edge_index[:, reverse] == edge_index[:, forward].flip(0)).all()
        & (shifts[reverse] == -shifts[forward]).all()
        & (torch.bincount(reverse, minlength=num_edges) <= 1).all()
    )
    if not bool(ok):
        return unpaired
    permutation = torch.cat([forward, reverse])
    return PairedEdges(edge_index[:, permutation], vectors[forward], True)


def _pipeline_pairs(edge_index: torch.Tensor, cell_shifts: torch.Tensor, vectors: torch.Tensor) -> PairedEdges:
    """Edges already ordered in reverse pairs; an asynchronous check (no host sync) fails loudly if they are not."""
    # Plain string literals below: TorchScript scripts this function and has no f-strings of module names.
    half = edge_index.shape[1] // 2
    if 2 * half != edge_index.shape[1]:
        raise ValueError(
            "The batch has 'num_edge_pairs' but an odd number of edges: it is not a paired list. "
            "Drop 'num_edge_pairs' after editing the edges."
        )
    reversed_ok = (edge_index[:, half:] == edge_index[:, :half].flip(0)).all()
    torch._assert_async(
        reversed_ok & (cell_shifts[half:] == -cell_shifts[:half]).all(),
        "edges marked as paired (num_edge_pairs) are not: edge k + E/2 must be edge k reversed",
    )
    return PairedEdges(edge_index, vectors[:half], True)


def times_edge_filter(x: torch.Tensor, edge_filter: torch.Tensor) -> torch.Tensor:
    """``x`` (E, ...) times a per-edge filter: ``edge_filter`` has E rows, or E/2 for paired edges
    (:class:`PairedEdges`), where both halves of the list share the rows of the first."""
    rows = edge_filter.shape[0]
    if rows == x.shape[0]:
        return x * edge_filter
    shape = x.shape
    return (x.view([shape[0] // rows, rows] + list(shape[1:])) * edge_filter).view(shape)


def init_linear_(module: nn.Module) -> None:
    """LeCun-normal weights (std 1/sqrt(fan_in)) and zero biases for every ``nn.Linear`` in ``module``,
    so that activations keep an O(1) scale through the blocks."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def init_radial_(layer: nn.Linear) -> None:
    """Unit-variance weights for a layer fed with a radial basis: the bases here have |rbf(r)| ~ 1 (not
    a per-component O(1) scale), so std 1 gives O(1) filters."""
    nn.init.normal_(layer.weight, std=1.0)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def append_isolated_atoms(numbers: torch.Tensor, max_z: int) -> torch.Tensor:
    """``numbers`` followed by 0..max_z: one extra node per element that no edge touches.

    Run through the same blocks as the real atoms, these give each element's output with no
    neighbours, which :func:`minus_isolated` subtracts: an isolated atom then contributes nothing
    beyond its reference energy, and the energy of atoms leaving each other's cutoff tends to it.
    """
    return torch.cat([numbers, torch.arange(max_z + 1, dtype=numbers.dtype, device=numbers.device)])


def minus_isolated(outputs: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """Per-atom ``outputs`` (real atoms then isolated ones, ``(N + max_z + 1, 1)``) less the isolated
    output of each atom's element; shape (N,)."""
    n = numbers.shape[0]
    return (outputs[:n] - outputs[n:][numbers]).squeeze(-1)


def check_sizes(hidden: int, interactions: int, max_z: int) -> None:
    """Reject student sizes that cannot build a model, naming every value and its bound."""
    if hidden < 2 or interactions < 1 or max_z < 1:
        raise ValueError(
            f"hidden={hidden} (>= 2), interactions={interactions} (>= 1) and max_z={max_z} (>= 1) are out of range."
        )
