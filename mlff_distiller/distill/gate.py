"""The stability gate: does the student survive the molecular dynamics it was distilled for?

:func:`stability_gate` runs the student in a cell of at least ``min_atoms`` atoms through the package's one MD
routine (:func:`mlff_distiller.md.driver.run_md`, ASE's integrators): Langevin NVT at ``temperature_factor`` x
the highest target temperature for ``nvt_ps``, then NVE (velocity Verlet) from the final NVT state for
``nve_ps``; with ``trajectories`` > 1, up to that many such trajectories with their own velocities, until one
fails (:func:`run_trajectories` runs any of them, so two processes can share them; :func:`combine_trajectories`
joins their outcomes). It passes when, documented thresholds all met, on every trajectory:

- both runs stay stable in the driver's sense (:mod:`mlff_distiller.md.stability`): energies and positions stay
  finite and no two atoms come closer than the bound
  (``min_distance_fraction`` x the smallest distance in the teacher-labelled data; 0.6 puts it well inside
  the repulsive wall: Cu-Cu neighbours are 2.55 Å, the bound ~1.4 Å), nor two atoms of an element pair
  closer than that fraction of the pair's own closest contact there (:func:`contact_bounds`: in water the
  O-H bond sets the first bound near 0.5 Å, which a molecule folded to H-H 0.6 Å passes; the H-H bound,
  ~0.8 Å, does not);
- the NVT run's mean temperature over its second half is within ``temperature_tolerance`` of the target
  (a student whose forces pump energy in heats up even against the thermostat);
- the NVE run's energy drift (slope of a linear fit of the total energy per atom) is at most
  ``max_nve_drift`` meV/atom/ps in magnitude. A smooth, conservative float32 student drifts by well under
  0.1 meV/atom/ps at these timesteps; 1 meV/atom/ps is a common bound for production MD.

:func:`verdict` turns the gate and the accuracy bounds into ``pass`` / ``fail`` with one reason per failed
criterion and :func:`advice` says what to try.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..teachers.structures import default_timestep_fs, supercell

if TYPE_CHECKING:
    from ase import Atoms

    from ..md.driver import MDSummary


class DistillationFailed(Exception):
    """Everything ran and was written, but the student failed its verdict (``mlff-train`` exits with
    :data:`mlff_distiller.cli.EXIT_VERDICT_FAILED`)."""


@dataclass
class GateConfig:
    """The stability gate (``distill_report.gate``); the shipped recipes use the issue's numbers."""

    nvt_ps: float = 20.0
    """Length of the NVT run, ps."""
    nve_ps: float = 10.0
    """Length of the NVE run that follows it, ps."""
    trajectories: int = 1
    """Independent trajectories (NVT then NVE from the same cell, each with its own velocities and thermostat
    noise), until one fails; the gate passes when every one does. A student can survive one trajectory and fail
    the next: more of them make a pass mean more, at up to that many times the MD (the report's two processes
    share them when it runs the gate beside its other work)."""
    temperature_factor: float = 1.5
    """The NVT run is at this x the highest target temperature."""
    min_atoms: int = 108
    """The cell is the reference structure repeated to at least this many atoms (periodic systems)."""
    timestep_fs: float | None = None
    """fs; null: 0.5 fs with hydrogen, else 2 fs."""
    hydrogen_mass: float | None = None
    """amu; e.g. 2.0 (deuterium) lets water run at 1 fs. Static (configurational) properties and the
    potential's stability do not depend on the masses; null keeps the real ones."""
    friction_per_fs: float = 0.01
    """Langevin friction of the NVT run, 1/fs."""
    record_every: int = 20
    """Steps between the driver's thermo rows: stability checks (closest approach, finite energy; a student's
    closest approach is also watched at every step) and recorded energies."""
    min_distance_fraction: float = 0.6
    """The closest-approach bound, as a fraction of the smallest interatomic distance in the labelled data."""
    temperature_tolerance: float = 0.2
    """Largest relative deviation of the NVT run's mean temperature (second half) from its target."""
    max_nve_drift: float = 1.0
    """meV/atom/ps; largest accepted magnitude of the NVE energy drift."""
    compile: bool | str = False
    """Run the student of the gate as one compiled graph (true or "inductor"; "fx"; false: eager): on one
    thread a PaiNN step of a 108-atom cell took 8.9 ms compiled vs 24.6 ms eager, after 15-50 s of compilation
    (``benchmarks/gate_step.py``), so it pays for gates of a few ps and more."""
    failure_window_ps: float = 1.0
    """When a run becomes unstable, its sane frames (every ``record_every`` steps) of this many ps before it
    did are kept (``gate_failure_frames.extxyz``): where the student went wrong, for the refinement to label. An
    NVE run that drifts too much keeps those before its largest energy jump (:func:`largest_energy_jump`)."""

    def __post_init__(self) -> None:
        for name in (
            "nvt_ps",
            "nve_ps",
            "temperature_factor",
            "temperature_tolerance",
            "max_nve_drift",
            "failure_window_ps",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"distill_report.gate.{name}={value!r} is invalid: it must be a finite number >= 0.")
        if self.nvt_ps + self.nve_ps <= 0:
            raise ValueError("distill_report.gate: nvt_ps and nve_ps are both 0; the gate would run nothing.")
        if not isinstance(self.trajectories, int) or isinstance(self.trajectories, bool) or self.trajectories < 1:
            raise ValueError(
                f"distill_report.gate.trajectories={self.trajectories!r} is invalid: it must be an integer >= 1."
            )
        if self.min_atoms < 1 or self.record_every < 1:
            raise ValueError(
                f"distill_report.gate: min_atoms={self.min_atoms} and record_every={self.record_every} must be >= 1."
            )
        if not 0 < self.min_distance_fraction < 1:
            raise ValueError(
                f"distill_report.gate.min_distance_fraction={self.min_distance_fraction} must be in (0, 1)."
            )
        from ..models.compiled import COMPILE_MODES, compile_mode

        try:
            compile_mode(self.compile)
        except ValueError:
            raise ValueError(
                f"distill_report.gate.compile={self.compile!r} is not a compile mode; accepted: true, false, "
                f"{', '.join(repr(m) for m in COMPILE_MODES)}."
            ) from None
        if self.timestep_fs is not None and not 0 < self.timestep_fs <= 10:
            raise ValueError(f"distill_report.gate.timestep_fs={self.timestep_fs} must be in (0, 10] fs or null.")


def contact_bounds(structures: Sequence[Atoms], fraction: float) -> dict[str, float]:
    """The gate's per-pair bounds: ``fraction`` x each element pair's closest contact in ``structures`` (Å)."""
    from ..md.stability import closest_contacts

    return {pair: fraction * distance for pair, distance in closest_contacts(structures).items()}


def sampled_bounds(structures: Sequence[Atoms], fraction: float) -> tuple[float, dict[str, float]]:
    """The closest-approach bounds set by a sampled set: ``fraction`` x its smallest interatomic distance, and
    :func:`contact_bounds` per element pair. Structures flagged ``train_only`` (the sampler's contact copies,
    whose pairs are pushed inside these bounds on purpose) do not count: they would loosen the bounds."""
    from ..data.keys import is_train_only
    from ..teachers.structures import min_distance

    measured = [atoms for atoms in structures if not is_train_only(atoms)]
    if not measured:
        raise ValueError("sampled_bounds: every structure is train_only; nothing sets the closest-approach bounds.")
    return fraction * min(min_distance(atoms) for atoms in measured), contact_bounds(measured, fraction)


def stability_gate(
    calculator: Any,
    reference: Atoms,
    target_temperatures: Sequence[float],
    config: GateConfig,
    min_distance_bound: float,
    seed: int = 0,
    pair_bounds: Mapping[str, float] | None = None,
    failure_frames: list[Atoms] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Run the gate (see the module docstring) with ``calculator`` (a
    :class:`~mlff_distiller.md.potential.StudentPotential` or any ASE calculator) from ``reference`` (repeated to
    ``config.min_atoms`` atoms when periodic), through :func:`mlff_distiller.md.driver.run_md` and its stability
    check, which also holds each element pair to its ``pair_bounds`` entry (Å, by name: ``{"H-H": 0.78}``).
    Returns (metrics, reasons it failed; empty when it passed). A run that becomes unstable appends its sane
    frames of the last ``config.failure_window_ps`` before it did to ``failure_frames`` (when given); an NVE run
    whose drift fails appends those of the window that ends with its largest energy jump (a student that does not
    conserve energy does so somewhere: there it is wrong). Each has ``info["gate_trajectory"]``,
    ``info["gate_segment"]``, ``info["gate_failure"]`` (``unstable`` / ``drift``), ``info["step"]`` and
    ``info["time_ps"]`` (of that segment). With ``config.trajectories`` > 1 they run in turn until one fails (its
    reasons name it; a verdict needs no more). :func:`run_trajectories` and :func:`combine_trajectories` are its
    two halves, for callers that share the trajectories between processes.

    Metrics: ``num_atoms``, ``temperature_K`` (the NVT target), ``min_distance_bound`` (and
    ``min_distance_bound/<pair>`` for each pair bound), ``timestep_fs``, per
    segment (``nvt/``, ``nve/``) the driver's ``time_ps``, ``min_distance``, ``mean_temperature`` (NVT: over its
    second half) and ``ns_per_day``, the NVE's ``energy_drift`` and ``max_energy_deviation`` (of trajectory 0;
    those of trajectory k > 0 under ``trajectory_<k>/``); ``trajectories`` (asked), ``trajectories_passed``,
    ``passed`` (1.0 / 0.0) and ``seconds`` (of MD, summed over the trajectories).
    """
    cell = gate_cell(reference, config)
    outcomes = run_trajectories(
        calculator,
        cell,
        target_temperatures,
        config,
        min_distance_bound,
        pair_bounds,
        seed,
        range(config.trajectories),
        keep_failure=failure_frames is not None,
    )
    metrics, reasons, frames = combine_trajectories(
        outcomes, cell, target_temperatures, config, min_distance_bound, pair_bounds
    )
    if failure_frames is not None:
        failure_frames += frames
    return metrics, reasons


@dataclass
class TrajectoryOutcome:
    """One trajectory of the gate: its index, metrics (``nvt/...``, ``nve/...``), the reasons it failed (empty:
    passed), the frames kept before its failure and its seconds."""

    index: int
    metrics: dict[str, float]
    reasons: list[str]
    frames: list[Any]
    seconds: float


def gate_cell(reference: Atoms, config: GateConfig) -> Atoms:
    """The gate's starting cell: ``reference`` repeated to ``config.min_atoms`` atoms (periodic), with the
    gate's hydrogen mass, without a calculator."""
    atoms = reference.copy()
    atoms.calc = None
    if atoms.pbc.all():
        atoms = supercell(atoms, config.min_atoms)
    if config.hydrogen_mass is not None:
        atoms.set_masses(np.where(atoms.numbers == 1, config.hydrogen_mass, atoms.get_masses()))
    return atoms


def _temperature_and_timestep(
    cell: Atoms, target_temperatures: Sequence[float], config: GateConfig
) -> tuple[float, float]:
    temperature = config.temperature_factor * max(target_temperatures)
    return temperature, config.timestep_fs if config.timestep_fs is not None else default_timestep_fs(cell)


def run_trajectories(
    calculator: Any,
    cell: Atoms,
    target_temperatures: Sequence[float],
    config: GateConfig,
    min_distance_bound: float,
    pair_bounds: Mapping[str, float] | None,
    seed: int,
    indices: Iterable[int],
    keep_failure: bool = False,
    stop: Callable[[], bool] | None = None,
) -> list[TrajectoryOutcome]:
    """The gate's trajectories ``indices`` from ``cell`` (:func:`gate_cell`), in that order, until one fails or
    ``stop()`` says that the gate has failed elsewhere (asked before each and during each, every
    ``record_every`` steps: a trajectory it stops is dropped, neither passed nor failed). Trajectory k draws its
    velocities and noise from ``seed`` and k alone, so it is the same whichever process runs it, in any order."""
    temperature, timestep = _temperature_and_timestep(cell, target_temperatures, config)
    outcomes = []
    for index in indices:
        if stop is not None and stop():
            break
        started = time.perf_counter()
        done = _trajectory(
            calculator,
            cell,
            config,
            temperature,
            timestep,
            min_distance_bound,
            pair_bounds,
            seed,
            index,
            keep_failure,
            stop,
        )
        if done is None:
            break
        metrics, reasons, kept = done
        outcomes.append(TrajectoryOutcome(index, metrics, reasons, kept, time.perf_counter() - started))
        if reasons:
            break
    return outcomes


def combine_trajectories(
    outcomes: Iterable[TrajectoryOutcome],
    cell: Atoms,
    target_temperatures: Sequence[float],
    config: GateConfig,
    min_distance_bound: float,
    pair_bounds: Mapping[str, float] | None,
) -> tuple[dict[str, float], list[str], list[Any]]:
    """The gate's metrics and reasons (see :func:`stability_gate`) from its trajectories' outcomes, from one
    process or several; and the frames of the failed trajectory with the lowest index (the one a gate that ran
    them in turn would have stopped at)."""
    outcomes = sorted(outcomes, key=lambda outcome: outcome.index)
    temperature, timestep = _temperature_and_timestep(cell, target_temperatures, config)
    metrics: dict[str, float] = {
        "num_atoms": float(len(cell)),
        "temperature_K": temperature,
        "min_distance_bound": min_distance_bound,
        "timestep_fs": timestep,
        **{f"min_distance_bound/{pair}": float(bound) for pair, bound in (pair_bounds or {}).items()},
    }
    reasons: list[str] = []
    frames: list[Any] = []
    for outcome in outcomes:
        # Trajectory 0 keeps the names of a one-trajectory gate; the others get their own.
        prefix = f"trajectory_{outcome.index}/" if outcome.index else ""
        said = f"trajectory {outcome.index}: " if config.trajectories > 1 else ""
        metrics.update({prefix + name: value for name, value in outcome.metrics.items()})
        reasons += [said + reason for reason in outcome.reasons]
        if outcome.reasons and not frames:
            frames = list(outcome.frames)
    passed = sum(1 for outcome in outcomes if not outcome.reasons)
    metrics["trajectories"] = float(config.trajectories)
    metrics["trajectories_passed"] = float(passed)
    metrics["passed"] = 1.0 if passed == config.trajectories and not reasons else 0.0
    metrics["seconds"] = sum(outcome.seconds for outcome in outcomes)
    return metrics, reasons, frames


class _Cancelled(Exception):
    """A gate trajectory stopped by its caller (the gate failed in another process)."""


def _trajectory(
    calculator: Any,
    atoms: Atoms,
    config: GateConfig,
    temperature: float,
    timestep: float,
    min_distance_bound: float,
    pair_bounds: Mapping[str, float] | None,
    seed: int,
    trajectory: int,
    keep_failure: bool,
    cancel: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], list[str], list[Atoms]] | None:
    """Trajectory ``trajectory`` of the gate, NVT then NVE from ``atoms``, its velocities and noise drawn from
    ``seed`` and its index: (metrics ``nvt/...``, ``nve/...``; reasons it failed; with ``keep_failure``, the frames
    before a failure); None when ``cancel()`` stopped it."""
    from ..md.driver import ENSEMBLES, MDSettings, run_md, seed_from

    # Trajectory 0 draws what a one-trajectory gate always drew.
    entropy = (seed, 29) if trajectory == 0 else (seed, 29, 1000 + trajectory)

    metrics: dict[str, float] = {}
    reasons: list[str] = []
    kept: list[Atoms] = []

    def segment(name: str, ps: float, start: Atoms, ensemble: str, equilibration_steps: int = 0) -> MDSummary:
        steps = int(round(1000.0 * ps / timestep))
        settings = MDSettings(
            ensemble=ensemble,
            temperature_K=temperature,
            timestep_fs=timestep,
            steps=steps,
            friction_per_ps=1000.0 * config.friction_per_fs,
            thermo_interval=config.record_every,
            write_interval=config.record_every,
            min_distance=min_distance_bound,
            pair_min_distance=dict(pair_bounds or {}),
            seed=seed_from(*entropy, ENSEMBLES.index(ensemble)),
            keep_velocities=ensemble == "nve" and config.nvt_ps > 0,
            equilibration_steps=min(equilibration_steps, steps),
        )
        keep = keep_failure and config.failure_window_ps > 0
        # The NVT run's first half is equilibration only for its mean temperature: a failure there counts too.
        summary = run_md(calculator, start, settings, keep_frames=keep, keep_equilibration=True, cancel=cancel)
        if summary.cancelled:
            raise _Cancelled
        failed_at, failure = None, ""
        if not summary.stable:
            failed_at, failure = summary.time_ps, "unstable"
        elif ensemble == "nve" and not abs(summary.energy_drift) <= config.max_nve_drift:
            failed_at, failure = largest_energy_jump(summary.thermo), "drift"
        if keep and failed_at is not None:
            for frame in summary.frames:
                if failed_at - config.failure_window_ps <= frame.info["time_ps"] <= failed_at:
                    frame.info.update(gate_trajectory=trajectory, gate_segment=name, gate_failure=failure)
                    kept.append(frame)
        fields = ["time_ps", "min_distance", "mean_temperature", "ns_per_day"]
        fields += ["energy_drift", "max_energy_deviation"] if ensemble == "nve" else []
        metrics.update({f"{name}/{field}": float(getattr(summary, field)) for field in fields})
        if not summary.stable:
            where = f"NVT at {temperature:g} K ({len(atoms)} atoms)" if ensemble == "nvt" else "NVE"
            reasons.append(f"{where} became unstable after {summary.time_ps:.3g} of {ps:g} ps: {summary.reason}")
        return summary

    start = atoms
    try:
        if config.nvt_ps > 0:
            # The mean temperature is taken over the second half: the first half forgets the starting velocities.
            nvt = segment("nvt", config.nvt_ps, atoms, "nvt", int(round(500.0 * config.nvt_ps / timestep)))
            mean_temperature = nvt.mean_temperature
            if nvt.stable and not abs(mean_temperature - temperature) <= config.temperature_tolerance * temperature:
                tolerance = 100 * config.temperature_tolerance
                reasons.append(
                    f"NVT mean temperature {mean_temperature:.0f} K is more than {tolerance:g} % "
                    f"off the {temperature:g} K target"
                )
            start = nvt.final.copy()
            # The thermostat moved the centre of mass; NVE starts with it at rest (its temperature counts 3N - 3).
            masses = start.get_masses()[:, None]
            momenta = start.get_momenta()
            start.set_momenta(momenta - masses * (momenta.sum(0) / masses.sum()))
        if config.nve_ps > 0 and not reasons:
            nve = segment("nve", config.nve_ps, start, "nve")
            drift = nve.energy_drift
            if nve.stable and not abs(drift) <= config.max_nve_drift:
                reasons.append(f"NVE energy drift {drift:.3g} meV/atom/ps exceeds ±{config.max_nve_drift:g}")
    except _Cancelled:
        return None
    return metrics, reasons, kept


def largest_energy_jump(thermo: Mapping[str, np.ndarray]) -> float:
    """The time (ps) of the thermo row that ends the largest change of the total energy between two rows: where
    an NVE run that drifts lost energy conservation the most (NaN rows are skipped; NaN without two rows)."""
    total, times = thermo["total_energy_eV"], thermo["time_ps"]
    finite = np.isfinite(total)
    if finite.sum() < 2:
        return math.nan
    total, times = total[finite], times[finite]
    return float(times[1 + int(np.argmax(np.abs(np.diff(total))))])


def verdict(gate_reasons: list[str], metrics: dict[str, Any], bounds: dict[str, float]) -> tuple[str, list[str]]:
    """``("pass" | "fail", reasons)``: the gate's reasons plus one per metric of ``bounds`` (name -> largest
    accepted value) that is above its bound, not finite, or missing (a bound on a metric that was not measured
    fails: a check that did not run must not pass)."""
    reasons = list(gate_reasons)
    for name, bound in bounds.items():
        value = metrics.get(name)
        if value is None:
            reasons.append(f"{name} was not measured (bound {bound:g})")
        elif not (isinstance(value, (int, float)) and math.isfinite(value)) or value > bound:
            reasons.append(f"{name} = {value:.4g} exceeds its bound {bound:g}")
    return ("fail" if reasons else "pass"), reasons


def advice(reasons: list[str]) -> str:
    """What to try, from what failed."""
    tips = []
    text = " ".join(reasons).lower()
    if "unstable" in text or "apart" in text:
        tips.append(
            "explore more where MD fails: more rounds or a larger budget (distill.rounds, distill.teacher_budget, "
            "distill.per_round), exploration at the gate's temperature (distill.explore.hot_factor), or learn from "
            "the gate's own failure (distill_report.refine.passes, with budget left for its frames)"
        )
    if "drift" in text or "temperature" in text:
        tips.append(
            "a smoother, better converged student: longer training (trainer.max_epochs), a smaller MD timestep "
            "(distill_report.gate.timestep_fs), or for a drift, learn from the frames before its largest energy jump "
            "(distill_report.refine.passes)"
        )
    if "force_mae" in text or "fresh" in text or "observables" in text:
        tips.append(
            "a more accurate student: an equivariant one (model=painn, wider with model.hidden; the committee and "
            "the cached rounds stay), longer training (trainer.max_epochs), more teacher labels (distill.rounds with "
            "a larger distill.teacher_budget: the rerun continues the loop)"
        )
    return "; ".join(tips) or "inspect distill_report.json"
