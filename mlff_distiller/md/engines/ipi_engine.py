"""i-PI integrating (classical MD with one bead, or path-integral MD with ``beads`` > 1), the student served by
ASE's ``SocketClient`` over a unix socket, as i-PI drives any ASE calculator.

The i-PI server runs in this process (``ipi.scripting.InteractiveSimulation``) and the client in a thread of
it, both on a private socket; a user's own i-PI input can drive the same client (``mlff_distiller.md.engines.
ipi_engine.serve``) from another process.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def import_engine() -> Any:
    import ipi.scripting  # noqa: F401

    return ipi


def serve(potential: Any, atoms: Any, unixsocket: str, use_stress: bool = False) -> None:
    """Answer i-PI's force requests on ``unixsocket`` with the student until i-PI ends the run (blocks)."""
    from ase.calculators.socketio import SocketClient

    from ...calculator import StudentCalculator

    atoms = atoms.copy()
    atoms.calc = StudentCalculator(potential)
    SocketClient(unixsocket=unixsocket).run(atoms, use_stress=use_stress)


class IPIEngine:
    """i-PI's ``nve`` (velocity Verlet) or ``nvt`` with its Langevin thermostat (time constant 1/friction), the
    centre of mass not fixed. ``beads`` > 1 runs path-integral MD (the state is then the centroid)."""

    def __init__(self, beads: int = 1, directory: str | None = None) -> None:
        if beads < 1:
            raise ValueError(f"beads={beads} is invalid: i-PI needs at least one bead.")
        self.beads = beads
        self.directory = directory
        self.simulation = None
        self.client: threading.Thread | None = None

    def start(self, atoms: Any, model: Any, settings: Any, start_step: int = 0) -> None:
        from ipi.scripting import InteractiveSimulation, forcefield_xml, simulation_xml

        self.atoms = atoms.copy()
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError(f"engine=ipi runs fully periodic or fully open systems; pbc={atoms.pbc.tolist()}.")
        self._scratch = None if self.directory else tempfile.TemporaryDirectory(prefix="mlff_ipi_")
        workdir = Path(self.directory or self._scratch.name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = f"mlff_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        start = atoms.copy()
        if not atoms.pbc.all():
            start.cell = np.eye(3) * 1e3  # i-PI always has a cell; one far larger than the molecule is none
        thermostat = ""
        if settings.ensemble == "nvt":
            tau_fs = 1000.0 / settings.friction_per_ps
            thermostat = f"<thermostat mode='langevin'><tau units='femtosecond'>{tau_fs!r}</tau></thermostat>"
        motion = (
            "<motion mode='dynamics'><fixcom>False</fixcom>"
            f"<dynamics mode='{settings.ensemble}'><timestep units='femtosecond'>{settings.timestep_fs!r}</timestep>"
            f"{thermostat}</dynamics></motion>"
        )
        output = f"<output prefix='{workdir / 'ipi'}'></output>"
        xml = simulation_xml(
            [start] * self.beads if self.beads > 1 else start,
            forcefield_xml("student", mode="unix", address=self.socket, latency=1e-4),
            motion,
            # i-PI's 'ase' temperature unit is the kelvin (with ASE's Boltzmann constant).
            temperature=settings.temperature_K if settings.ensemble == "nvt" or self.beads > 1 else None,
            output=output,
            safe_stride=10**9,
        )
        # i-PI draws its thermostat noise from its own generator, seeded from the clock unless told otherwise.
        seed = int(getattr(settings, "seed", 0) or 0) + start_step
        tag_end = xml.index(">", xml.index("<simulation")) + 1
        xml = f"{xml[:tag_end]}<prng><seed>{seed}</seed></prng>{xml[tag_end:]}"
        self.simulation = InteractiveSimulation(xml)
        self.simulation.chk.filename = str(workdir / "ipi.RESTART")  # i-PI's restart file, else in the cwd
        self.client = threading.Thread(target=serve, args=(model, start, self.socket), daemon=True)
        self.client.start()
        structures = [start] * self.beads if self.beads > 1 else start
        for structure in structures if isinstance(structures, list) else [structures]:
            structure.set_momenta(atoms.get_momenta())
        self.simulation.set_structures(structures)

    def advance(self, steps: int) -> None:
        self.simulation.run(steps, write_outputs=False)

    def state(self) -> Any:
        structures = self.simulation.get_structures()
        beads = structures if isinstance(structures, list) else [structures]
        frame = self.atoms.copy()
        frame.positions = np.mean([b.positions for b in beads], axis=0)
        frame.set_momenta(np.mean([b.get_momenta() for b in beads], axis=0))
        return frame

    def close(self) -> None:
        if self.simulation is not None:
            from ipi.utils.softexit import softexit

            self.simulation.stop()
            self.simulation = None
            # i-PI's soft exit is process-wide: it took over SIGINT/SIGTERM and watches for an EXIT file. Give the
            # signals back (a Trainer in this process must see its own) and let its monitor thread end.
            softexit.reset()
        if self.client is not None:
            self.client.join(timeout=10)
            self.client = None
        if self._scratch is not None:
            self._scratch.cleanup()
