"""Teachers for the parallel-labelling tests, importable by name in spawned worker processes
(``CalculatorSpec("labelkit:FailingEMT", ...)``; pytest puts this directory on ``sys.path`` and spawned
processes inherit it)."""

from __future__ import annotations

from ase.calculators.emt import EMT


class FailingEMT(EMT):
    """EMT that raises ``RuntimeError`` when asked about the structure whose first atom is at ``fail_x`` (Å)."""

    def __init__(self, fail_x: float | None = None) -> None:
        super().__init__()
        self.fail_x = fail_x

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        if self.fail_x is not None and abs(float(atoms.positions[0, 0]) - self.fail_x) < 1e-9:
            raise RuntimeError("teacher died (simulated failure in a worker)")
        kwargs = {} if system_changes is None else {"system_changes": system_changes}
        super().calculate(atoms, properties, **kwargs)
