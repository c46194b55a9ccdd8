"""The one molecular-dynamics routine of the distillation loop and its report.

Exploration (student-driven Langevin MD whose frames become candidates), fresh-frame sampling and the
stability gate (NVT, then NVE) all call :func:`run_md`, so a faster engine (e.g. an ASE runner with a
neighbour-list skin) replaces MD for all of them in one place. A run that becomes unphysical (non-finite
energy or positions, two atoms closer than a bound, an exception from the calculator) stops early and
says why; it never raises, because an unstable run is a result here, not an error.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..teachers.structures import default_timestep_fs, maxwell_boltzmann_momenta, min_distance

if TYPE_CHECKING:
    from ase import Atoms

ENSEMBLES = ("nvt", "nve")


@dataclass
class MDRun:
    """What :func:`run_md` recorded, one entry per recorded step (the start included)."""

    times_ps: list[float] = field(default_factory=list)
    potential_energy: list[float] = field(default_factory=list)
    """eV/atom."""
    total_energy: list[float] = field(default_factory=list)
    """eV/atom."""
    temperature_K: list[float] = field(default_factory=list)
    frames: list[Atoms] = field(default_factory=list)
    """Copies of the structure at recorded steps after ``equilibration_steps`` (with ``keep_frames``), each with
    ``info["md_step"]`` and ``info["md_time_ps"]``; all of them passed the checks."""
    min_distance: float = math.inf
    """Å, smallest interatomic distance over the recorded steps that passed the checks."""
    steps_done: int = 0
    timestep_fs: float = 0.0
    stopped: str | None = None
    """Why the run stopped early (None: it ran all its steps)."""
    final: Atoms | None = None
    """The last structure that passed the checks, with its momenta (to continue from it)."""

    @property
    def stable(self) -> bool:
        return self.stopped is None

    @property
    def time_ps(self) -> float:
        return self.steps_done * self.timestep_fs / 1000.0

    def energy_drift(self) -> float:
        """meV/atom/ps: slope of a linear fit of the total energy per atom against time (NaN with < 2 points)."""
        times, energies = np.asarray(self.times_ps), np.asarray(self.total_energy)
        finite = np.isfinite(energies)
        if finite.sum() < 2 or np.ptp(times[finite]) == 0:
            return math.nan
        return 1e3 * float(np.polyfit(times[finite], energies[finite], 1)[0])

    def max_energy_deviation(self) -> float:
        """meV/atom: largest deviation of the total energy per atom from its first value."""
        energies = np.asarray(self.total_energy)
        finite = energies[np.isfinite(energies)]
        return 1e3 * float(np.abs(finite - finite[0]).max()) if len(finite) else math.nan


def run_md(
    atoms: Atoms,
    calculator: Any,
    steps: int,
    ensemble: str = "nvt",
    temperature_K: float = 300.0,
    timestep_fs: float | None = None,
    friction_per_fs: float = 0.02,
    record_every: int = 10,
    equilibration_steps: int = 0,
    min_distance_bound: float = 0.0,
    rng: np.random.Generator | None = None,
    draw_momenta: bool = True,
    keep_frames: bool = False,
    masses: dict[int, float] | None = None,
) -> MDRun:
    """Run ``steps`` steps of Langevin (``ensemble="nvt"``, centre of mass fixed) or velocity-Verlet (``"nve"``)
    MD of a copy of ``atoms`` driven by ``calculator``, checking the structure every ``record_every`` steps.

    Momenta are drawn from Maxwell-Boltzmann at ``temperature_K`` (``draw_momenta``), else those of ``atoms`` are
    kept (to continue a run). ``timestep_fs`` None: 0.5 fs with hydrogen, else 2 fs. ``masses`` maps atomic
    numbers to masses (amu), e.g. ``{1: 2.0}`` for heavy hydrogen. The run stops at the first recorded step
    with a non-finite energy or position, or two atoms closer than ``min_distance_bound`` (Å), or when the
    calculator raises; :attr:`MDRun.stopped` says which.
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble={ensemble!r} is invalid; accepted: {', '.join(ENSEMBLES)}.")
    if record_every < 1 or steps < 0:
        raise ValueError(f"record_every={record_every} must be >= 1 and steps={steps} >= 0.")
    rng = rng if rng is not None else np.random.default_rng(0)
    work = atoms.copy()
    work.calc = calculator
    if masses:
        work.set_masses([masses.get(int(z), m) for z, m in zip(work.numbers, work.get_masses())])
    step_fs = timestep_fs if timestep_fs is not None else default_timestep_fs(work)
    if draw_momenta:
        work.set_momenta(maxwell_boltzmann_momenta(work, temperature_K, rng))
    if ensemble == "nvt":
        work.set_constraint(FixCom())  # ASE's recommended replacement for Langevin(fixcm=True)
        dynamics = Langevin(
            work,
            timestep=step_fs * units.fs,
            temperature_K=temperature_K,
            friction=friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
        )
    else:
        dynamics = VelocityVerlet(work, timestep=step_fs * units.fs)
    result = MDRun(timestep_fs=step_fs)
    done = 0
    while True:
        reason, closest = _check(work, min_distance_bound)
        if reason is not None:
            result.stopped = f"{reason} after {done * step_fs / 1000.0:.3g} ps"
            break
        potential = float(work.get_potential_energy()) / len(work)
        result.times_ps.append(done * step_fs / 1000.0)
        result.potential_energy.append(potential)
        result.total_energy.append(potential + float(work.get_kinetic_energy()) / len(work))
        result.temperature_K.append(float(work.get_temperature()))
        result.min_distance = min(result.min_distance, closest)
        result.steps_done = done
        result.final = work.copy()
        result.final.calc = None
        if keep_frames and done > equilibration_steps:
            frame = work.copy()
            frame.calc = None
            frame.set_constraint()
            frame.info.update(md_step=done, md_time_ps=done * step_fs / 1000.0)
            result.frames.append(frame)
        if done >= steps:
            break
        chunk = min(record_every, steps - done)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a run that blows up
                dynamics.run(chunk)
        except Exception as error:  # an unphysical structure can make the calculator itself fail
            failure = f"the calculator failed ({type(error).__name__}: {error})"
            result.stopped = f"{failure} after {done * step_fs / 1000:.3g} ps"
            break
        done += chunk
    if result.final is not None:
        result.final.set_constraint()
    return result


def _check(atoms: Atoms, bound: float) -> tuple[str | None, float]:
    """(why ``atoms`` with its calculator is unphysical or None, its smallest interatomic distance)."""
    if not np.isfinite(atoms.positions).all():
        return "non-finite positions", math.nan
    closest = min_distance(atoms)
    try:
        energy = float(atoms.get_potential_energy())
    except Exception as error:
        return f"the calculator failed ({type(error).__name__}: {error})", closest
    if not math.isfinite(energy):
        return "non-finite energy", closest
    if closest < bound:
        return f"atoms {closest:.3g} Å apart, below the {bound:.3g} Å bound", closest
    return None, closest
