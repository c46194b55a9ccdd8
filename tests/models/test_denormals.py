"""No denormal floats in a training step: CPU arithmetic on them (below 1.2e-38 in float32) is 10-100x
slower, and the Gaussian radial basis's tails made a SchNet step 2x slower."""

from __future__ import annotations

import math

import pytest
import torch
from atoms_testkit import cu_au_cell, make_batch, small_model
from torch.utils._python_dispatch import TorchDispatchMode

from mlff_distiller.data import keys
from mlff_distiller.models.common import GAUSSIAN_EXPONENT_FLOOR, GaussianRBF


class DenormalCounter(TorchDispatchMode):
    """Counts the denormal float32 values in the outputs of every op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in str(func):  # uninitialised memory, overwritten by the next op
            return out
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.numel():
                denormal = int(((value != 0) & (value.abs() < torch.finfo(torch.float32).tiny)).sum())
                if denormal:
                    self.count += denormal
                    self.ops.add(str(func))
        return out


def test_gaussians_are_exact_above_the_floor_and_zero_below():
    rbf = GaussianRBF(32, 5.0).double()
    distances = torch.linspace(0.0, 5.0, 2001, dtype=torch.float64)
    exponent = rbf.coefficient * (distances[:, None] - rbf.centers) ** 2  # -(r - mu)² / (2 w²)
    assert rbf.coefficient == pytest.approx(-0.5 * (31 / 5.0) ** 2, rel=1e-6)
    exact = math.pi**-0.25 * torch.exp(exponent)
    values = rbf(distances)
    inside = exponent > GAUSSIAN_EXPONENT_FLOOR
    torch.testing.assert_close(values[inside], exact[inside], rtol=1e-12, atol=0)
    assert (values[~inside] == 0).all() and (~inside).sum() > 1000  # the far tails are cut
    assert float(exact[~inside].max()) < 1e-21  # by less than any sum of O(1) terms resolves
    float32 = GaussianRBF(32, 5.0)(distances.float())
    assert not ((float32 != 0) & (float32 < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_a_float32_training_step_makes_almost_no_denormal_floats(name):
    model = small_model(name, cutoff=5.0, num_rbf=32, compute_stress=True).float().train()  # default basis width
    batch = make_batch([cu_au_cell(0), cu_au_cell(1)], cutoff=5.0, dtype=torch.float32)
    with DenormalCounter() as counter:
        out = model(batch)
        loss = out[keys.ENERGY].pow(2).sum() + out[keys.FORCES].pow(2).sum() + out[keys.STRESS].pow(2).sum()
        loss.backward()
    # A stray product of two small numbers can land there; the uncut basis made ~50,000 in this step.
    assert counter.count <= 10, f"{counter.count} denormal floats from {sorted(counter.ops)}"
