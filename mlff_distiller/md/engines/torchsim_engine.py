"""torch-sim (``torch-sim-atomistic``) integrating on tensors, the student as a torch-sim ``ModelInterface``.

:class:`StudentModel` is the model torch-sim calls: batched over every system of a ``SimState`` (one neighbour
list per system, reused within the skin), so many small systems run as one batch. :class:`TorchSimEngine`
runs one structure under :func:`~mlff_distiller.md.driver.run_md`; for batches of systems use ``StudentModel``
with torch-sim's own integrators (see ``benchmarks/md_throughput.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def import_engine() -> Any:
    import torch_sim

    return torch_sim


def student_model(potential: Any, compute_stress: bool = False) -> Any:
    """A torch-sim ``ModelInterface`` around a :class:`~mlff_distiller.md.potential.StudentPotential`."""
    from torch_sim.models.interface import ModelInterface

    class StudentModel(ModelInterface):
        """energy (S,), forces (N, 3) and, with ``compute_stress``, stress (S, 3, 3) of a batched ``SimState``."""

        def __init__(self) -> None:
            super().__init__()
            self.potential = potential
            self._device = potential.device
            self._dtype = potential.dtype
            self._compute_stress = compute_stress
            self._compute_forces = True

        def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            counts = torch.bincount(state.system_idx, minlength=state.n_systems)
            pbc = bool(state.pbc) if not torch.is_tensor(state.pbc) else state.pbc
            return self.potential(
                state.positions,
                state.atomic_numbers,
                state.row_vector_cell,
                pbc,
                num_atoms=counts.tolist(),
                stress=self._compute_stress,
            )

    return StudentModel()


class TorchSimEngine:
    """torch-sim's ``nve`` (velocity Verlet) or ``nvt_langevin`` (BAOAB) update functions, stepped here.

    torch-sim wraps positions into the cell every step; :meth:`state` follows each atom across the cell's faces,
    so it returns the same (unwrapped) positions as the other engines. NVT seeds torch's global RNG (torch-sim
    draws its noise from it).
    """

    def start(self, atoms: Any, model: Any, settings: Any, start_step: int = 0) -> None:

        import_engine()
        from torch_sim.integrators import nve, nvt_langevin
        from torch_sim.integrators.md import MDState
        from torch_sim.units import MetalUnits

        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError(f"engine=torchsim runs fully periodic or fully open systems; pbc={atoms.pbc.tolist()}.")
        self.atoms = atoms.copy()
        self.model = student_model(model)
        device, dtype = model.device, model.dtype

        def tensor(value: Any, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(value), dtype=kind, device=device)

        # torch-sim's metal units: Å, eV, amu and ASE's time unit (sqrt(amu Å² / eV)), so momenta carry over.
        timestep = tensor(settings.timestep_fs * 1e-3 * MetalUnits.time)
        kT = tensor(settings.temperature_K * MetalUnits.temperature)
        if settings.ensemble == "nve":
            _, self.update = nve(self.model, dt=timestep, kT=kT)
        else:
            torch.manual_seed(settings.seed + start_step + 1)
            gamma = tensor(settings.friction_per_ps / MetalUnits.time)
            _, self.update = nvt_langevin(self.model, dt=timestep, kT=kT, gamma=gamma)
        periodic = bool(atoms.pbc.all())
        positions = tensor(atoms.positions)
        cell = tensor(atoms.cell.array).T.unsqueeze(0)  # column vectors
        numbers = tensor(atoms.numbers, torch.long)
        output = self.model.potential(positions, numbers, atoms.cell.array, atoms.pbc)
        self.state_ = MDState(
            positions=positions,
            momenta=tensor(atoms.get_momenta()),
            energy=output["energy"],
            forces=output["forces"],
            masses=tensor(atoms.get_masses()),
            cell=cell,
            pbc=periodic,
            atomic_numbers=numbers,
            system_idx=torch.zeros(len(atoms), dtype=torch.long, device=device),
        )
        self.unwrapped = atoms.positions.copy()
        self.previous = atoms.positions.copy()

    def advance(self, steps: int) -> None:
        for _ in range(steps):
            self.state_ = self.update(self.state_)

    def state(self) -> Any:
        wrapped = self.state_.positions.detach().cpu().double().numpy()
        step = wrapped - self.previous
        if self.atoms.pbc.all():  # moved by less than half a cell per chunk: the rest is a wrap
            cell = self.atoms.cell.array
            step -= np.round(np.linalg.solve(cell.T, step.T).T) @ cell
        self.unwrapped = self.unwrapped + step
        self.previous = wrapped
        frame = self.atoms.copy()
        frame.positions = self.unwrapped
        frame.set_momenta(self.state_.momenta.detach().cpu().double().numpy())
        return frame

    def close(self) -> None:
        self.state_ = None
