"""Shared helpers for the teacher tests: an EMT calculator that counts (and can fail) its calls."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT


class CountingEMT(EMT):
    """EMT that counts its calculations; raises ``RuntimeError`` once ``fail_after`` calls are done,
    and returns a NaN energy (``nan_energy_at``) or NaN forces (``nan_forces_at``) on that 0-based call."""

    def __init__(self, fail_after=None, nan_energy_at=None, nan_forces_at=None):
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after
        self.nan_energy_at = nan_energy_at
        self.nan_forces_at = nan_forces_at

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("teacher died (simulated interruption)")
        kwargs = {} if system_changes is None else {"system_changes": system_changes}
        super().calculate(atoms, properties, **kwargs)
        if self.calls == self.nan_energy_at:
            self.results["energy"] = float("nan")
        if self.calls == self.nan_forces_at:
            self.results["forces"] = self.results["forces"].copy()
            self.results["forces"][3, 1] = np.inf
        self.calls += 1


@pytest.fixture
def counting_emt():
    """Factory for :class:`CountingEMT`."""
    return CountingEMT


@pytest.fixture(scope="session")
def alloy_structures():
    """A small, fixed set of generated alloy structures (rattled and MD), shared read-only by the tests."""
    from mlff_distiller.teachers import generate_alloy_structures

    return generate_alloy_structures(24, seed=3, snapshots_per_run=4)
