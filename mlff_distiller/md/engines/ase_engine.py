"""ASE's own integrators: velocity Verlet (NVE) and Langevin (NVT), with the student (or any ASE calculator)."""

from __future__ import annotations

from typing import Any

import numpy as np


def import_engine() -> None:
    import ase.md  # noqa: F401  (ASE is a dependency; kept for a uniform engine interface)


class ASEEngine:
    """``ase.md.verlet.VelocityVerlet`` or ``ase.md.langevin.Langevin`` (centre of mass not fixed)."""

    def start(self, atoms: Any, model: Any, settings: Any, start_step: int = 0) -> None:
        from ase import units
        from ase.md.langevin import Langevin
        from ase.md.verlet import VelocityVerlet

        from ...calculator import StudentCalculator
        from ..potential import StudentPotential

        self.atoms = atoms.copy()
        self.atoms.calc = StudentCalculator(model) if isinstance(model, StudentPotential) else model
        timestep = settings.timestep_fs * units.fs
        if settings.ensemble == "nve":
            self.dynamics = VelocityVerlet(self.atoms, timestep=timestep)
        else:
            self.dynamics = Langevin(
                self.atoms,
                timestep=timestep,
                temperature_K=settings.temperature_K,
                friction=settings.friction_per_ps / (1000.0 * units.fs),
                fixcm=False,
                rng=np.random.default_rng(settings.seed + start_step + 1),
            )

    def advance(self, steps: int) -> None:
        self.dynamics.run(steps)

    def state(self) -> Any:
        frame = self.atoms.copy()
        frame.calc = None
        return frame

    def close(self) -> None:
        self.dynamics = None
