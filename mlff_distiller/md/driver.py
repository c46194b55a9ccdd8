"""The MD driver every engine runs under: settings, initial velocities, thermo and trajectory output, the
stability check and the summary. It is the one MD routine of the package: ``mlff-md``, and in the distillation
path the round-0 sampling driven by the teacher, the students' exploration, the fresh frames, the stability gate
and the observables' MD all run through it, so "unstable" means the same everywhere.

:func:`run_md` advances an engine (:mod:`mlff_distiller.md.engines`) in chunks of ``thermo_interval`` steps.
After each chunk it reads the state back (positions and momenta in the input frame, ASE units), evaluates
the potential energy and, for periodic cells, the stress there, appends a ``thermo.csv`` row, writes a
trajectory frame every ``write_interval`` steps, and stops the run as soon as
:class:`~mlff_distiller.md.stability.StabilityGuard` names a violation. The summary holds the speed (ns/day,
atom-steps/s), the energy drift (NVE), the closest approach and the mean temperature (after
``equilibration_steps``); with ``keep_frames`` it also holds the frames in memory.

Temperatures count 3N - 3 degrees of freedom in NVE (runs start with the centre of mass at rest and forces
sum to zero, so it stays at rest) and 3N in NVT (the Langevin thermostats also thermalise the centre of mass).
"""

from __future__ import annotations

import csv
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .potential import StudentPotential
from .stability import StabilityGuard, closest_approach

log = logging.getLogger(__name__)

ENSEMBLES = ("nve", "nvt")


@dataclass
class MDSettings:
    """What to run; the same for every engine."""

    ensemble: str = "nve"
    """``nve`` (velocity Verlet) or ``nvt`` (Langevin thermostat)."""
    temperature_K: float = 300.0
    """Initial Maxwell-Boltzmann velocities and, in NVT, the thermostat's target (K)."""
    timestep_fs: float = 1.0
    """Integration time step (fs)."""
    steps: int = 1000
    """Steps to run (in all, counting those of the run resumed from)."""
    friction_per_ps: float = 10.0
    """Langevin friction (1/ps; NVT only): the velocities forget themselves in about 1/friction."""
    thermo_interval: int = 10
    """Steps between thermo.csv rows and stability checks (each costs one extra energy evaluation)."""
    write_interval: int = 100
    """Steps between trajectory frames (a multiple of ``thermo_interval``)."""
    min_distance: float | None = None
    """Å. The run is unstable when two atoms come closer; None: half the closest approach at the start."""
    pair_min_distance: dict[str, float] | None = None
    """Å per element pair (``{"O-H": 0.5, "H-H": 0.8}``): the run is also unstable when two atoms of that pair
    come closer (checked every ``thermo_interval`` steps)."""
    seed: int = 0
    """Seeds the initial velocities and the thermostat's noise."""
    keep_velocities: bool = False
    """Start from the momenta the structure carries instead of drawing Maxwell-Boltzmann velocities."""
    equilibration_steps: int = 0
    """Steps (counted from step 0) left out of the mean temperature and the energy drift, and before which no
    frame is kept: the run forgets its starting velocities first."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field, its value and what is accepted."""
        checks = [
            ("ensemble", self.ensemble in ENSEMBLES, f"one of {', '.join(ENSEMBLES)}"),
            ("temperature_K", _finite(self.temperature_K) and self.temperature_K >= 0, "a number >= 0"),
            ("timestep_fs", _finite(self.timestep_fs) and self.timestep_fs > 0, "a number > 0"),
            ("steps", isinstance(self.steps, int) and self.steps >= 0, "an integer >= 0"),
            ("friction_per_ps", _finite(self.friction_per_ps) and self.friction_per_ps > 0, "a number > 0"),
            ("thermo_interval", isinstance(self.thermo_interval, int) and self.thermo_interval >= 1, "an integer >= 1"),
            (
                "write_interval",
                isinstance(self.write_interval, int)
                and self.write_interval >= 1
                and self.write_interval % self.thermo_interval == 0,
                f"an integer >= 1 and a multiple of thermo_interval={self.thermo_interval}",
            ),
            ("min_distance", self.min_distance is None or _finite(self.min_distance), "null or a number >= 0 (Å)"),
            (
                "equilibration_steps",
                isinstance(self.equilibration_steps, int) and self.equilibration_steps >= 0,
                "an integer >= 0",
            ),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be {accepted}.")
        StabilityGuard.for_structure(None, 0.0, self.pair_min_distance)  # names a bad pair or bound


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class MDSummary:
    """How a run went. ``stable`` False: ``reason`` says what happened and when."""

    engine: str
    ensemble: str
    num_atoms: int
    stable: bool
    reason: str
    steps: int
    """Steps done (by this run and the one it resumed)."""
    time_ps: float
    wall_s: float
    """Seconds spent advancing the engine (set-up and output excluded)."""
    ns_per_day: float
    atom_steps_per_s: float
    energy_drift: float
    """meV/atom/ps: slope of a linear fit of the total energy per atom (NVE; NaN in NVT)."""
    max_energy_deviation: float
    """meV/atom: largest |E_total - E_total(start)| (NVE; NaN in NVT); start: the first row after equilibration."""
    min_distance: float
    """Å: closest approach over the run (every force evaluation of a student, every thermo row otherwise)."""
    min_distance_bound: float
    mean_temperature: float
    """K, over the thermo rows after the first and after ``equilibration_steps`` (the starting temperature is
    imposed, not sampled)."""
    thermo: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """The thermo.csv columns, also when no file is written."""
    final: Any = field(default=None, repr=False)
    """The last state read back (ASE ``Atoms`` with momenta, in the input frame)."""
    frames: list[Any] = field(default_factory=list, repr=False)
    """With ``keep_frames``: copies of the states at every ``write_interval``-th step after
    ``equilibration_steps`` that passed the stability check (ASE ``Atoms`` with momenta; ``info["step"]``,
    ``info["time_ps"]``)."""
    cancelled: bool = False
    """The caller's ``cancel`` stopped the run before its last step (it is neither finished nor unstable)."""

    def metrics(self, prefix: str = "md/") -> dict[str, Any]:
        """The scalar fields as ``{prefix + name: value}`` (``stable`` as 1.0 / 0.0)."""
        out = {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if k not in ("thermo", "final", "frames", "reason", "engine", "ensemble", "cancelled")
        }
        out["stable"] = 1.0 if self.stable else 0.0
        return {prefix + name: value for name, value in out.items()}


THERMO_COLUMNS = (
    "step",
    "time_ps",
    "potential_energy_eV",
    "kinetic_energy_eV",
    "total_energy_eV",
    "temperature_K",
    "pressure_GPa",
    "closest_approach_A",
)


def initial_momenta(atoms: Any, temperature_K: float, seed: int) -> np.ndarray:
    """Maxwell-Boltzmann momenta at ``temperature_K`` without centre-of-mass motion (ASE units)."""
    from ase import units

    masses = atoms.get_masses()[:, None]
    momenta = np.random.default_rng(seed).standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    return momenta - masses * (momenta.sum(0) / masses.sum())


def seed_from(*entropy: int) -> int:
    """An :attr:`MDSettings.seed` derived from a tuple of integers (e.g. (seed, round, run)) by numpy's
    ``SeedSequence``: runs keyed by different tuples get unrelated velocities and thermostat noise."""
    return int(np.random.SeedSequence([int(part) for part in entropy]).generate_state(1)[0])


def run_md(
    model: Any,
    atoms: Any,
    settings: MDSettings,
    engine: str = "ase",
    output_dir: str | Path | None = None,
    start_step: int = 0,
    engine_options: dict[str, Any] | None = None,
    keep_frames: bool = False,
    keep_equilibration: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> MDSummary:
    """Run MD of ``atoms`` with ``model`` in ``engine`` and return its summary (also when it became unstable).

    Args:
        model: a :class:`StudentPotential`, or for ``engine="ase"`` any ASE calculator (e.g. a teacher); a
            :class:`~mlff_distiller.calculator.StudentCalculator` runs as its potential (the closest approach is
            then watched at every force call).
        atoms: the starting structure (not modified); with ``settings.keep_velocities`` its momenta are used.
        settings: see :class:`MDSettings` (validated first).
        engine: ``ase``, ``lammps``, ``ipi``, ``openmm`` or ``torchsim``; a missing package raises
            :class:`~mlff_distiller.md.engines.EngineUnavailableError` naming the extra to install.
        output_dir: where ``thermo.csv``, ``trajectory.extxyz`` and ``restart.traj`` go (None: nowhere).
        start_step: the step ``atoms`` is at (resuming a run from its ``restart.traj``).
        engine_options: extra keyword arguments for the engine (see each engine's class).
        keep_frames: keep the frames of :attr:`MDSummary.frames` in memory.
        keep_equilibration: with ``keep_frames``, keep those of the equilibration steps too.
        cancel: asked after every ``thermo_interval`` steps; True stops the run there (``MDSummary.cancelled``).
    """
    from ..calculator import StudentCalculator
    from .engines import make_engine

    settings.validate()
    if isinstance(model, StudentCalculator):
        model = model.potential
    if len(atoms) < 2:
        raise ValueError(f"MD needs at least 2 atoms; the structure has {len(atoms)}.")
    if not isinstance(model, StudentPotential) and engine != "ase":
        raise TypeError(f"engine={engine!r} runs a student (StudentPotential); an ASE calculator runs only in 'ase'.")
    runner = make_engine(engine, **(engine_options or {}))  # a missing package stops here, before any work
    atoms = atoms.copy()
    atoms.calc = None
    if not settings.keep_velocities or not atoms.has("momenta"):
        atoms.set_momenta(initial_momenta(atoms, settings.temperature_K, settings.seed + start_step))
    guard = StabilityGuard.for_structure(atoms, settings.min_distance, settings.pair_min_distance)
    evaluate = _frame_evaluator(model)
    output = _Output(Path(output_dir) if output_dir is not None else None)
    dof = 3 * len(atoms) - (3 if settings.ensemble == "nve" else 0)
    recorder = _Thermo(len(atoms), dof, settings.timestep_fs)

    if isinstance(model, StudentPotential):
        model.reset_closest()
    runner.start(atoms, model, settings, start_step)
    step, wall, reason, cancelled = start_step, 0.0, None, False
    frames: list[Any] = []

    def keep(frame: Any) -> None:
        kept_from = 0 if keep_equilibration else settings.equilibration_steps
        if keep_frames and step > kept_from and step % settings.write_interval == 0:
            kept = frame.copy()
            kept.info.update(step=step, time_ps=step * settings.timestep_fs * 1e-3)
            frames.append(kept)

    try:
        frame = runner.state()
        energy, stress, closest = evaluate(frame)
        recorder.add(step, frame, energy, stress, closest)
        output.frame(step, frame, energy, recorder, trajectory=True)
        reason = guard.violation(step, energy, closest) or guard.pair_violation(step, frame)
        if reason is None:
            keep(frame)
        while reason is None and step < settings.steps:
            chunk = min(settings.thermo_interval, settings.steps - step)
            started = time.perf_counter()
            error = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a run that blows up
                    runner.advance(chunk)
            except Exception as exc:  # an engine that stops on its own (e.g. LAMMPS' lost atoms)
                error = exc
            wall += time.perf_counter() - started
            step += chunk
            seen = model.reset_closest() if isinstance(model, StudentPotential) else math.inf
            if error is not None:
                reason = _engine_stop(error, model, guard, step, seen)
                break
            frame = runner.state()
            energy, stress, closest = evaluate(frame)
            closest = min(closest, seen) if not math.isnan(closest) else closest
            recorder.add(step, frame, energy, stress, closest)
            reason = guard.violation(step, energy, closest) or guard.pair_violation(step, frame)
            if reason is None:
                keep(frame)
            output.frame(
                step, frame, energy, recorder, trajectory=reason is not None or step % settings.write_interval == 0
            )
            if reason is None and step < settings.steps and cancel is not None and cancel():
                cancelled = True
                break
    finally:
        runner.close()
        output.close(recorder)

    if reason is not None:  # the caller says it as loud as it matters (mlff-md: exit code 4; the gate: a reason)
        log.debug("MD became unstable: %s.", reason)
    time_ps = step * settings.timestep_fs * 1e-3
    done = step - start_step
    return MDSummary(
        engine=engine,
        ensemble=settings.ensemble,
        num_atoms=len(atoms),
        stable=reason is None,
        reason=reason or "",
        steps=step,
        time_ps=time_ps,
        wall_s=wall,
        ns_per_day=done * settings.timestep_fs * 1e-6 / wall * 86400.0 if wall > 0 else math.nan,
        atom_steps_per_s=done * len(atoms) / wall if wall > 0 else math.nan,
        min_distance_bound=guard.min_distance,
        final=frame,
        frames=frames,
        cancelled=cancelled,
        **recorder.summary(settings.ensemble, max(start_step, settings.equilibration_steps)),
    )


def _engine_stop(error: Exception, model: Any, guard: StabilityGuard, step: int, seen: float) -> str:
    """The reason an engine that raised during a chunk stopped, when the student saw the run become unstable
    (atoms too close, non-finite positions); otherwise the engine's error is raised as it is."""
    cause = None
    if isinstance(model, StudentPotential):
        cause = guard.violation(step, 0.0, seen)
        if cause is None and model.stats.nonfinite_calls:
            cause = f"positions became non-finite by step {step}"
    if cause is None:
        raise error
    return f"{cause}; the engine then stopped ({type(error).__name__}: {error})"


def _frame_evaluator(model: Any):
    """(energy eV, stress 3x3 eV/Å³ or None, closest approach Å) of a frame, with a fresh neighbour list."""

    def with_potential(frame: Any) -> tuple[float, np.ndarray | None, float]:
        if not np.isfinite(frame.positions).all():
            return math.nan, None, math.nan
        periodic = bool(frame.pbc.all())
        out = model(frame.positions, frame.numbers, frame.cell.array, frame.pbc, stress=periodic, reuse_neighbors=False)
        energy = float(out["energy"].sum())
        stress = out["stress"][0].cpu().double().numpy() if periodic else None
        return energy, stress, closest_approach(frame)

    def with_calculator(frame: Any) -> tuple[float, np.ndarray | None, float]:
        frame = frame.copy()
        frame.calc = model
        energy = float(frame.get_potential_energy())  # the step's own result (ASE keeps it): no extra call
        # Stress only when the calculator computed it with the forces: asking for it could cost a teacher call.
        stress = None
        if frame.pbc.all() and "stress" in getattr(model, "implemented_properties", ()):
            stress = model.get_property("stress", frame, allow_calculation=False)
        if stress is not None and np.shape(stress) != (3, 3):
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = voigt_6_to_full_3x3_stress(stress)
        return energy, stress, closest_approach(frame)

    return with_potential if isinstance(model, StudentPotential) else with_calculator


class _Thermo:
    """The thermo rows of a run, as columns."""

    def __init__(self, num_atoms: int, dof: int, timestep_fs: float) -> None:
        self.num_atoms, self.dof, self.timestep_fs = num_atoms, dof, timestep_fs
        self.rows: list[dict[str, float]] = []

    def add(self, step: int, frame: Any, energy: float, stress: np.ndarray | None, closest: float) -> dict[str, float]:
        from ase import units

        kinetic = float(frame.get_kinetic_energy())
        pressure = math.nan
        if stress is not None:
            # P = 2K / 3V - tr(sigma) / 3 (ASE's stress sign: positive is tensile).
            pressure = (2.0 * kinetic / (3.0 * frame.get_volume()) - float(np.trace(stress)) / 3.0) / units.GPa
        row = {
            "step": step,
            "time_ps": step * self.timestep_fs * 1e-3,
            "potential_energy_eV": energy,
            "kinetic_energy_eV": kinetic,
            "total_energy_eV": energy + kinetic,
            "temperature_K": 2.0 * kinetic / (self.dof * units.kB),
            "pressure_GPa": pressure,
            "closest_approach_A": closest,
        }
        self.rows.append(row)
        return row

    def columns(self) -> dict[str, np.ndarray]:
        return {name: np.array([row[name] for row in self.rows], dtype=np.float64) for name in THERMO_COLUMNS}

    def summary(self, ensemble: str, sampled_after: int) -> dict[str, Any]:
        """The averages over the rows from step ``sampled_after`` on (the mean temperature: after it)."""
        columns = self.columns()
        sampled = columns["step"] >= sampled_after
        total = columns["total_energy_eV"][sampled] / self.num_atoms
        finite = np.isfinite(total)
        drift = deviation = math.nan
        if ensemble == "nve" and finite.sum() > 1:
            drift = 1e3 * float(np.polyfit(columns["time_ps"][sampled][finite], total[finite], 1)[0])
            deviation = 1e3 * float(np.abs(total[finite] - total[0]).max())
        temperatures = columns["temperature_K"][columns["step"] > sampled_after]
        closest = columns["closest_approach_A"]
        return {
            "energy_drift": drift,
            "max_energy_deviation": deviation,
            "min_distance": float(np.nanmin(closest)) if np.isfinite(closest).any() else float(closest.min()),
            "mean_temperature": float(temperatures.mean()) if len(temperatures) else math.nan,
            "thermo": columns,
        }


class _Output:
    """thermo.csv, trajectory.extxyz and restart.traj of a run (nothing when ``directory`` is None)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._csv = self._writer = self._trajectory = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._csv = open(directory / "thermo.csv", "w", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._csv, fieldnames=THERMO_COLUMNS)
        self._writer.writeheader()

    def frame(self, step: int, frame: Any, energy: float, thermo: _Thermo, trajectory: bool) -> None:
        if self.directory is None:
            return
        row = thermo.rows[-1]
        self._writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._csv.flush()
        if not trajectory:
            return
        import ase.io
        from ase.calculators.singlepoint import SinglePointCalculator

        snapshot = frame.copy()
        snapshot.info.update(step=step, time_ps=row["time_ps"])
        snapshot.calc = SinglePointCalculator(snapshot, energy=energy)
        ase.io.write(
            self.directory / "trajectory.extxyz", snapshot, format="extxyz", append=bool(self._trajectory) or step > 0
        )
        self._trajectory = True
        # The exact state (float64 positions and momenta) to resume from, replaced atomically.
        restart, partial = self.directory / "restart.traj", self.directory / ".restart.traj.partial"
        ase.io.write(partial, snapshot, format="traj")
        partial.replace(restart)

    def close(self, thermo: _Thermo) -> None:
        if self._csv is not None:
            self._csv.close()
