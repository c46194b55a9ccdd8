"""OpenMM integrating (Reference platform, double precision), the student as an ``openmm.PythonForce``.

NVE uses a velocity-Verlet ``CustomIntegrator`` (OpenMM's ``VerletIntegrator`` is leapfrog, whose velocities
are half a step off the positions); NVT uses ``LangevinMiddleIntegrator``, whose velocities are half a step
off too (the thermo rows then use those). Units: nm, ps, kJ/mol, dalton.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def import_engine() -> Any:
    import openmm

    if not hasattr(openmm, "PythonForce"):
        raise ImportError(f"openmm {openmm.__version__} has no PythonForce (OpenMM >= 8.3 has)")
    return openmm


class OpenMMEngine:
    """An OpenMM ``Context`` holding the system; ``platform`` names OpenMM's platform (default Reference)."""

    def __init__(self, platform: str = "Reference") -> None:
        self.platform = platform
        self.context = None

    def start(self, atoms: Any, model: Any, settings: Any, start_step: int = 0) -> None:
        from ase import units

        openmm = import_engine()
        self.atoms = atoms.copy()
        self.potential = model
        self.numbers = atoms.numbers.copy()
        self.pbc = np.asarray(atoms.pbc, dtype=bool)
        if self.pbc.any() and not self.pbc.all():
            raise ValueError(f"engine=openmm runs fully periodic or fully open systems; pbc={self.pbc.tolist()}.")
        self.energy_unit = units.mol / units.kJ  # kJ/mol per eV
        self.time_unit = 1000.0 * units.fs  # ASE time units per ps
        if self.pbc.all():
            rotated, self.rotation = atoms.cell.standard_form()  # OpenMM wants the reduced (lower-triangular) form
            self.cell = np.array(rotated)
        else:
            self.rotation, self.cell = np.eye(3), np.zeros((3, 3))

        system = openmm.System()
        for mass in atoms.get_masses():
            system.addParticle(float(mass))
        force = openmm.PythonForce(self._compute)
        force.setUsesPeriodicBoundaryConditions(bool(self.pbc.all()))
        system.addForce(force)
        if self.pbc.all():
            system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*(0.1 * row)) for row in self.cell))
        timestep_ps = settings.timestep_fs * 1e-3
        if settings.ensemble == "nve":
            integrator = openmm.CustomIntegrator(timestep_ps)
            integrator.addUpdateContextState()
            integrator.addComputePerDof("v", "v + 0.5 * dt * f / m")
            integrator.addComputePerDof("x", "x + dt * v")
            integrator.addComputePerDof("v", "v + 0.5 * dt * f / m")
        else:
            integrator = openmm.LangevinMiddleIntegrator(settings.temperature_K, settings.friction_per_ps, timestep_ps)
            integrator.setRandomNumberSeed(settings.seed + start_step + 1)
        self.integrator = integrator
        self.context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(self.platform))
        self.context.setPositions(0.1 * atoms.positions @ self.rotation.T)
        self.context.setVelocities(0.1 * self.time_unit * atoms.get_velocities() @ self.rotation.T)

    def _compute(self, state: Any) -> tuple[float, np.ndarray]:
        import openmm.unit as u

        positions = 10.0 * np.asarray(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        cell = self.cell
        if self.pbc.all():
            cell = 10.0 * np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.nanometer))
        out = self.potential(positions, self.numbers, cell, self.pbc)
        energy = float(out["energy"].sum()) * self.energy_unit
        forces = out["forces"].cpu().double().numpy() * (10.0 * self.energy_unit)  # eV/Å -> kJ/mol/nm
        return energy, forces

    def advance(self, steps: int) -> None:
        self.integrator.step(steps)

    def state(self) -> Any:
        import openmm.unit as u

        state = self.context.getState(getPositions=True, getVelocities=True)
        positions = 10.0 * np.asarray(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        velocities = 10.0 * np.asarray(state.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond))
        frame = self.atoms.copy()
        frame.positions = positions @ self.rotation
        frame.set_velocities(velocities @ self.rotation / self.time_unit)
        return frame

    def close(self) -> None:
        self.context = None
