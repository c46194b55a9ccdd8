"""A screened nuclear repulsion prior (ZBL) under a student's learned energy.

A distilled student is only trained where the teacher's structures went; closer than any of them its energy is
an extrapolation, and a student whose extrapolation is attractive lets two atoms fall into each other in long
MD. The Ziegler-Biersack-Littmark universal screened
Coulomb potential is the physical answer at those distances. Here it acts on a pair only closer than
``radius_factor`` x the sum of the two elements' covalent radii (ASE's table), switched off smoothly by a
polynomial envelope (value and first two derivatives vanish at that radius), so bonded and non-bonded
neighbours at ordinary distances feel little or none of it and the network learns the teacher's energy less
the prior. Foundation models (MACE's pair repulsion, nequip's ZBL term) add the same prior for the same reason.
It guards only inside the covalent reach: on the water recipes' rounds it did not stop a folding molecule
(H-H reach 0.62 Å) or two oxygens meeting at 1.38 Å (O-O reach 1.32 Å), and cost 7-12 % in validation force
error, so the recipes leave it off (``benchmarks/README.md``).
"""

from __future__ import annotations

import torch
from torch import nn

COULOMB_EV_ANGSTROM = 14.399645
"""e^2 / (4 pi eps0) in eV Å."""
SCREENING_LENGTH_ANGSTROM = 0.46850
"""The ZBL universal screening length: a = 0.46850 Å / (Z_i^0.23 + Z_j^0.23)."""
SCREENING_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
SCREENING_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


class ZBLRepulsion(nn.Module):
    """Per-atom ZBL energies (eV) of the pairs closer than ``radius_factor`` x (r_cov,i + r_cov,j).

    Each pair's energy is split half to each atom, so the per-atom terms sum to the pair sum of a full
    (both directions) edge list. ``envelope_power`` p sets the switching polynomial
    1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2), x = r / reach (value, slope and curvature
    vanish at x = 1).
    """

    def __init__(self, max_z: int = 100, radius_factor: float = 1.0, envelope_power: int = 6) -> None:
        super().__init__()
        from ase.data import covalent_radii

        if not radius_factor > 0:
            raise ValueError(f"radius_factor={radius_factor} must be > 0 (the prior's reach, x covalent radii).")
        if envelope_power < 2:
            raise ValueError(f"envelope_power={envelope_power} must be >= 2 (a smooth switch-off).")
        self.radius_factor = float(radius_factor)
        self.envelope_power = int(envelope_power)
        # The envelope is (1 - x)^3 times the first p terms of the series of (1 - x)^-3: the same polynomial,
        # without the cancellation of its ~50-sized monomials near x = 1 (float32 put ~1e-5 of noise there).
        self.envelope_coefficients = [0.5 * (k + 1) * (k + 2) for k in range(self.envelope_power)]
        # Attributes: TorchScript cannot read module-level constants.
        self.coulomb = COULOMB_EV_ANGSTROM
        self.screening_length = SCREENING_LENGTH_ANGSTROM
        self.coefficients = list(SCREENING_COEFFICIENTS)
        self.exponents = list(SCREENING_EXPONENTS)
        # float64, so that a float64 student gets the table's values exactly (a float32 one rounds them).
        self.register_buffer("covalent_radii", torch.tensor(covalent_radii[: max_z + 1], dtype=torch.float64))

    def forward(self, numbers: torch.Tensor, edge_index: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``numbers`` (atoms,) atomic numbers, ``edge_index`` (2, edges) of a full neighbour list and their
        ``distances`` (edges,) -> (atoms,) energies in the dtype of ``distances``."""
        i, j = edge_index[0], edge_index[1]
        zi = torch.index_select(numbers, 0, i).to(distances.dtype)
        zj = torch.index_select(numbers, 0, j).to(distances.dtype)
        radii = self.covalent_radii.to(distances.dtype)
        reach = torch.index_select(radii, 0, torch.index_select(numbers, 0, i))
        reach = self.radius_factor * (reach + torch.index_select(radii, 0, torch.index_select(numbers, 0, j)))
        screening = self.screening_length / (zi.pow(0.23) + zj.pow(0.23))
        x = distances / screening
        c, d = self.coefficients, self.exponents
        phi = c[0] * torch.exp(-d[0] * x) + c[1] * torch.exp(-d[1] * x) + c[2] * torch.exp(-d[2] * x)
        phi = phi + c[3] * torch.exp(-d[3] * x)
        # Clamped so that pairs beyond the reach get exactly zero, with zero gradient.
        u = torch.clamp(distances / reach, max=1.0)
        series = torch.zeros_like(u)
        for coefficient in self.envelope_coefficients[::-1]:  # Horner
            series = series * u + coefficient
        envelope = (1.0 - u).pow(3) * series
        pair = self.coulomb * zi * zj / distances * phi * envelope
        return torch.zeros(numbers.shape[0], dtype=distances.dtype, device=distances.device).index_add(0, i, 0.5 * pair)
