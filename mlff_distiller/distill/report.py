"""How good, how fast and how trustworthy a distilled student is, next to its teacher, with a verdict.

:func:`distillation_report` takes the final student, the teacher (an ASE calculator), the held-out sampled
test split and the system's seed structures, and measures

- accuracy against the teacher on the sampled test split: energy MAE (meV/atom), force MAE, RMSE and std
  (meV/Å), Hessian-row MAE (meV/Å²) when the structures carry rows (``test/...``);
- accuracy on **fresh frames**: snapshots of the student's own Langevin MD at each target temperature,
  labelled by the teacher and never trained on: where a distilled student fails (``fresh/...``; the
  frames are written to ``fresh_frames.extxyz``; their teacher calls are counted apart);
- speed: single-point energy + forces per second of teacher and student on the same structures
  (periodic systems: supercells of about 32 and 256 atoms) (``speed/...``);
- the stability gate (:mod:`.gate`: NVT at 1.5x the highest target temperature, then NVE) (``gate/...``); with
  ``parallel`` it runs in a second one-thread process beside the fresh frames and the observables (the
  longest parts, on two cores), which then runs the odd ones of several trajectories itself (a failure on
  either side stops both), and ``gate.compile`` runs its student as a compiled graph; when its MD becomes
  unstable, the sane frames before it did go to ``gate_failure_frames.extxyz`` (an NVE drift: those before its
  largest energy jump; ``refine`` passes learn from them, :mod:`.refine`);
- observables, student vs teacher (:mod:`.observables`: equation of state and bulk modulus, vibrational
  frequencies, RDF, by the kind of system) (``observables/...``);
- the active loop's rounds when there was one: teacher calls per round, fresh-frame error per round
  (``loop/...``, ``teacher_calls/...``) and a learning curve;

and gives the verdict: ``verdict`` is ``pass`` when the gate passed and every metric named in ``bounds``
is within its bound, else ``fail`` with one entry per failed check in ``reasons``. It writes
``distill_report.json``, ``parity.png`` (sampled test split and fresh frames) and ``learning_curve.png``
into ``output_dir``. :func:`print_report` shows the metrics as a table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..evaluation import evaluate_structures
from ..plots import parity_plot
from ..teachers.structures import default_timestep_fs, fresh_copy, min_distance, supercell
from ..training.config import check_known_fields
from .budget import total_teacher_calls
from .gate import (
    GateConfig,
    TrajectoryOutcome,
    advice,
    combine_trajectories,
    contact_bounds,
    gate_cell,
    run_trajectories,
    verdict,
)
from .refine import RefineConfig

if TYPE_CHECKING:
    from ase import Atoms

    from .loop import LoopResult

log = logging.getLogger(__name__)

FRESH_FRICTION_PER_PS = 20.0
"""Langevin friction of the fresh-frame MD, 1/ps (the exploration's)."""

GATE_FAILURE_FRAMES = "gate_failure_frames.extxyz"
"""Written by the report when the gate's MD became unstable: its sane frames of the last
``gate.failure_window_ps`` before it did (unlabelled; the refinement labels some)."""

SPEED_SIZES = (32, 256)
"""Atoms in the structures timed for speed (periodic systems; at least this many)."""


@dataclass
class ReportConfig:
    """Options of the report (``distill_report`` in the recipes)."""

    speed_sizes: list[int] = field(default_factory=lambda: list(SPEED_SIZES))
    """Atoms in the timed supercells (at least; periodic systems only)."""
    speed_seconds: float = 1.0
    """Timing budget per calculator and size, s."""
    fresh_frames: int = 8
    """Fresh frames per target temperature (0: no fresh-frame test)."""
    fresh_interval: int = 25
    """MD steps between fresh frames."""
    fresh_equilibration_steps: int = 100
    """MD steps before the first fresh frame."""
    fresh_timestep_fs: float | None = None
    """fs; null: 0.5 fs with hydrogen, else 2 fs."""
    gate: GateConfig = field(default_factory=GateConfig)
    """The stability gate."""
    observables: dict[str, Any] | None = None
    """Keyword options of :func:`mlff_distiller.distill.observables.observables_report`; null: no observables."""
    parallel: bool = False
    """Run the stability gate in a second (spawned, one-thread) process while this one, on one thread, computes
    the observables: the two longest parts of the report on the two cores of a small machine."""
    refine: RefineConfig = field(default_factory=RefineConfig)
    """Refinement passes when the gate's MD becomes unstable (:mod:`.refine`; ``mlff-train`` runs them)."""
    bounds: dict[str, float] = field(default_factory=lambda: {"fresh/force_mae_rel": 0.05})
    """Metric name -> largest accepted value, part of the verdict (a bound on a metric not measured fails; a
    null value removes the bound)."""

    def __post_init__(self) -> None:
        if isinstance(self.gate, Mapping):
            self.gate = GateConfig(**dict(self.gate))
        if isinstance(self.refine, Mapping):
            check_known_fields(RefineConfig, self.refine, "distill_report.refine option")
            self.refine = RefineConfig(**dict(self.refine))
        self.observables = dict(self.observables) if self.observables is not None else None
        # A null bound removes one set elsewhere (a recipe that does not measure that metric).
        self.bounds = {str(k): float(v) for k, v in dict(self.bounds).items() if v is not None}
        if self.fresh_frames < 0 or self.fresh_interval < 1 or self.fresh_equilibration_steps < 0:
            raise ValueError(
                f"distill_report: fresh_frames={self.fresh_frames} must be >= 0, fresh_interval={self.fresh_interval} "
                f">= 1 and fresh_equilibration_steps={self.fresh_equilibration_steps} >= 0."
            )
        if self.speed_seconds < 0:
            raise ValueError(f"distill_report.speed_seconds={self.speed_seconds} must be >= 0.")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ReportConfig:
        """Build from a mapping, naming unknown keys and the accepted ones."""
        check_known_fields(cls, options, "distill_report option")
        return cls(**dict(options))


# ---------------------------------------------------------------------- speed
def speed_structures(reference: Any, sizes: Sequence[int] = SPEED_SIZES) -> list[Any]:
    """Supercells of a periodic ``reference`` with at least each of ``sizes`` atoms (the cell itself when it
    is big enough); a non-periodic one is returned alone, as it is."""
    base = reference.copy()
    base.calc = None
    if not base.pbc.all():
        return [base]
    return [supercell(base, size) for size in sizes]


def calls_per_second(calculator: Any, atoms: Any, min_seconds: float = 1.0, min_calls: int = 3) -> float:
    """Single-point energy + forces evaluations per second of ``calculator`` on ``atoms`` (after one warm-up
    call; at least ``min_calls`` calls and ``min_seconds`` s; cached results are never reused)."""
    from ase.calculators.calculator import all_changes

    atoms = atoms.copy()

    def call() -> None:
        calculator.reset()
        calculator.calculate(atoms, ["energy", "forces"], all_changes)

    call()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


# ---------------------------------------------------------------------- fresh frames
def fresh_frames(
    calculator: Any,
    starts: Sequence[Atoms],
    temperatures: Sequence[float],
    per_temperature: int,
    interval: int,
    equilibration_steps: int,
    timestep_fs: float | None,
    min_distance_bound: float,
    seed: int = 0,
) -> tuple[list[Atoms], list[str]]:
    """Snapshots of the student's own Langevin MD (:func:`mlff_distiller.md.driver.run_md`; ``calculator`` a
    :class:`~mlff_distiller.md.potential.StudentPotential` or an ASE calculator): ``per_temperature`` frames
    every ``interval`` steps after ``equilibration_steps`` at each temperature, starting from ``starts`` in turn.
    Returns (frames, one line per run that became unstable); frames of such a run are those before it did."""
    from ..md.driver import MDSettings, run_md, seed_from

    frames, unstable = [], []
    for i, temperature in enumerate(temperatures):
        start = fresh_copy(starts[i % len(starts)])
        settings = MDSettings(
            ensemble="nvt",
            temperature_K=float(temperature),
            timestep_fs=timestep_fs if timestep_fs is not None else default_timestep_fs(start),
            steps=equilibration_steps + per_temperature * interval,
            friction_per_ps=FRESH_FRICTION_PER_PS,
            thermo_interval=interval,
            write_interval=interval,
            min_distance=min_distance_bound,
            seed=seed_from(seed, i, 31),
            equilibration_steps=equilibration_steps,
        )
        run = run_md(calculator, start, settings, keep_frames=True)
        if not run.stable:
            unstable.append(f"{temperature:g} K: {run.reason}")
        for frame in run.frames:
            step = int(frame.info["step"])
            frames.append(
                fresh_copy(
                    frame,
                    provenance=f"fresh:driver=final_student:T={temperature:g}K:run={i}:step={step}",
                    config_type=f"fresh_{temperature:g}K",
                    temperature_K=float(temperature),
                )
            )
    return frames, unstable


# ---------------------------------------------------------------------- the gate, here or beside
def _gate_job(task: tuple) -> tuple[list[TrajectoryOutcome], float | None]:
    """The gate's trajectories ``indices`` (:func:`~.gate.run_trajectories`) with the final student (a picklable
    task: it may run in a spawned process): (their outcomes, 1.0 when the student ran as a compiled graph, 0.0
    when eagerly, None when no trajectory ran).
    ``failed``, an event shared with the process running the others (or None), stops both at the first failure."""
    from ..calculator import StudentCalculator

    model, cell, temperatures, config, bound, pair_bounds, seed, dtype, indices, failed = task
    try:
        calculator = StudentCalculator(model, dtype=dtype, compile=config.compile)
        stop = failed.is_set if failed is not None else None
        outcomes = run_trajectories(
            calculator, cell, temperatures, config, bound, pair_bounds, seed, indices, keep_failure=True, stop=stop
        )
    except BaseException:
        # An error here ends the report: the other side must not run its trajectories to the end first.
        if failed is not None:
            failed.set()
        raise
    if failed is not None and any(outcome.reasons for outcome in outcomes):
        failed.set()
    if not outcomes:
        return outcomes, None
    graphs = getattr(calculator.model, "compiled", None)
    # A failed trace or compilation falls back to eager, with a warning.
    return outcomes, float(graphs is not None and any(g is not None for g in graphs.graphs.values()))


def _failure_copies(frames: Sequence[Atoms], temperature: float) -> list[Atoms]:
    """Plain copies of the gate's failure frames, with their provenance: the frames carry the gate's masses
    (heavy hydrogen) and momenta, which labels must not."""
    return [
        fresh_copy(
            frame,
            provenance=(
                f"gate:trajectory={frame.info['gate_trajectory']}:segment={frame.info['gate_segment']}"
                f":failure={frame.info['gate_failure']}:step={frame.info['step']}"
            ),
            config_type="gate_failure",
            gate_trajectory=int(frame.info["gate_trajectory"]),
            gate_segment=frame.info["gate_segment"],
            gate_failure=frame.info["gate_failure"],
            step=int(frame.info["step"]),
            time_ps=float(frame.info["time_ps"]),
            temperature_K=temperature,
        )
        for frame in frames
    ]


@contextlib.contextmanager
def _beside(job: Callable[[tuple], Any], task: tuple, parallel: bool) -> Iterator[Callable[[], Any]]:
    """Run ``job(task)`` while the block runs: in a spawned one-thread process, with this process on one thread
    meanwhile, when ``parallel``; else here, after the block. Yields the function that returns its result (call
    it after the block). The process is stopped if the block raises; its own error is raised here."""
    if not parallel:
        yield lambda: job(task)
        return
    from ..teachers.labelling import single_threaded_children

    context = _spawn_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(job, task, sender), daemon=True)
    with single_threaded_children():
        process.start()
    sender.close()  # the child holds the only sending end: its death ends the pipe (EOFError below)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outcome: list[Any] = []
    try:
        yield lambda: outcome[0]
        try:
            status, value = receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(
                f"The process running {job.__name__} died (exit code {process.exitcode}) without a result."
            ) from None
        if status == "error":
            raise RuntimeError(f"{job.__name__} failed in its process:\n{value}")
        outcome.append(value)
    finally:
        torch.set_num_threads(threads)
        receiver.close()
        if process.is_alive():
            process.terminate()
        process.join()


def _spawn_context() -> Any:
    """The multiprocessing context of :func:`_beside` (spawn: a fresh interpreter, safe beside torch's threads)."""
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _send_result(job: Callable[[tuple], Any], task: tuple, sender: Any) -> None:
    """The spawned side of :func:`_beside`: one thread, ``("ok", result)`` or ``("error", traceback)``."""
    import traceback

    # Warnings of the spawned side (e.g. a compiled graph that fell back to eager) reach the console.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(1)
    try:
        message = ("ok", job(task))
    except BaseException:
        message = ("error", traceback.format_exc())
    sender.send(message)
    sender.close()


# ---------------------------------------------------------------------- plots
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib).")
        return None
    return plt


def learning_curve_plot(
    points: Sequence[tuple[float, float, str]], path: str | os.PathLike[str], target: float | None = None
) -> Path | None:
    """Fresh-frame force MAE (% of the teacher's force std) against teacher calls; ``points`` are
    (calls, ratio, label). None without matplotlib or points."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 4))
    calls = [p[0] for p in points]
    ratios = [100 * p[1] for p in points]
    axis.plot(calls, ratios, marker="o")
    for x, y, label in zip(calls, ratios, [p[2] for p in points]):
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if target is not None:
        axis.axhline(100 * target, color="0.6", linestyle="--", linewidth=1, label=f"target {100 * target:g} %")
        axis.legend(fontsize=8)
    axis.set_xlabel("teacher calls for training labels")
    axis.set_ylabel("fresh-frame force MAE (% of teacher force std)")
    axis.set_yscale("log")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------- the report
def distillation_report(
    student: nn.Module,
    teacher: Any,
    test_structures: Sequence[Any],
    output_dir: str | os.PathLike[str],
    references: Sequence[Atoms],
    target_temperatures: Sequence[float],
    config: ReportConfig | None = None,
    loop: LoopResult | None = None,
    min_distance_bound: float | None = None,
    student_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pair_bounds: Mapping[str, float] | None = None,
    refined: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy, fresh frames, speed, stability gate, observables and the verdict (see the module docstring).

    Args:
        student: the final student (has ``cutoff``); not modified.
        teacher: the teacher's ASE calculator.
        test_structures: the held-out sampled split with the teacher's labels (calculator results or the
            ``_energy``/``_forces`` entries of :func:`~mlff_distiller.data.dataset.read_labelled_structures`).
        output_dir: where the JSON, plots and fresh frames go.
        references: the system's seed structures: speed, the gate and observables use the first, fresh-frame
            MD starts from each in turn.
        target_temperatures: K; fresh frames are sampled at each, the gate runs at 1.5x the highest.
        config: the options (:class:`ReportConfig`).
        loop: the active loop's result, for its rounds and teacher calls.
        min_distance_bound: Å; default ``gate.min_distance_fraction`` x the smallest distance in the test split.
        pair_bounds: the gate's bound per element pair (Å, ``{"H-H": 0.78}``); default
            ``gate.min_distance_fraction`` x each pair's closest contact in the test split.
        student_dtype: precision of the student in the speed and MD runs.
        refined: ``refine/...`` metrics of the refinement passes that made this student (:mod:`.refine`), kept in
            the report; their ``refine/teacher_calls`` count in ``teacher_calls/train``.

    Returns flat metrics (``test/...``, ``fresh/...``, ``speed/...``, ``gate/...``, ``observables/...``,
    ``loop/...``, ``teacher_calls/...``, ``time/...``), ``verdict`` (``"pass"``/``"fail"``) and ``reasons``
    (a list of strings).
    """
    from ..calculator import StudentCalculator
    from ..teachers.labelling import label_structures, read_labelled

    config = config or ReportConfig()
    if not test_structures:
        raise ValueError("distillation_report needs at least one held-out structure.")
    if not references:
        raise ValueError("distillation_report needs at least one reference (seed) structure.")
    if not target_temperatures:
        raise ValueError("distillation_report needs the target temperatures (fresh frames and the gate).")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    clock = time.perf_counter()
    test = evaluate_structures(student, test_structures, metric_groups_key=None, source="the sampled test split")
    metrics: dict[str, Any] = {f"test/{name}": value for name, value in test.metrics.items()}
    metrics["seed"] = seed  # of the MD runs (fresh frames, gate, observables)
    if min_distance_bound is None:
        min_distance_bound = config.gate.min_distance_fraction * min(min_distance(a) for a in test_structures)
    if pair_bounds is None:
        pair_bounds = contact_bounds(test_structures, config.gate.min_distance_fraction)
    calculator = StudentCalculator(student, dtype=student_dtype)

    fresh_parity = None
    clock = time.perf_counter()
    reference = references[0]
    speed_atoms = speed_structures(reference, config.speed_sizes)
    labels = config.speed_sizes if reference.pbc.all() else [len(reference)]
    for size, atoms in zip(labels, speed_atoms):
        teacher_rate = calls_per_second(teacher, atoms, config.speed_seconds)
        student_rate = calls_per_second(calculator, atoms, config.speed_seconds)
        metrics[f"speed/{size}/num_atoms"] = float(len(atoms))
        metrics[f"speed/{size}/teacher_per_s"] = teacher_rate
        metrics[f"speed/{size}/student_per_s"] = student_rate
        metrics[f"speed/{size}/speedup"] = student_rate / teacher_rate
    times["speed_s"] = time.perf_counter() - clock

    # The task may be pickled into another process: the student pickles its compiled graphs as their mode only,
    # and the cell carries no calculator. With several trajectories and a second process, that process runs the
    # even ones and this one the odd ones once its own work is done: on two cores a passing gate of 3 trajectories
    # then takes 2 of them in time, not 3; the first failure on either side stops both.
    cell = gate_cell(reference, config.gate)
    trajectories = range(config.gate.trajectories)
    shared = config.parallel and config.gate.trajectories > 1
    failed = _spawn_context().Event() if shared else None
    there = trajectories[::2] if shared else trajectories

    def gate_task(indices: Sequence[int]) -> tuple:
        return (
            student,
            cell,
            list(target_temperatures),
            config.gate,
            min_distance_bound,
            dict(pair_bounds),
            seed,
            student_dtype,
            list(indices),
            failed,
        )

    here: tuple[list[TrajectoryOutcome], float | None] = ([], None)
    with _beside(_gate_job, gate_task(there), config.parallel) as gate_result:
        # The fresh frames (the student's MD, then teacher labels) run beside the gate too: they time nothing.
        clock = time.perf_counter()
        if config.fresh_frames > 0:
            frames, unstable = fresh_frames(
                calculator,
                references,
                target_temperatures,
                config.fresh_frames,
                config.fresh_interval,
                config.fresh_equilibration_steps,
                config.fresh_timestep_fs,
                min_distance_bound,
                seed,
            )
            metrics["fresh/unstable_runs"] = float(len(unstable))
            for line in unstable:
                log.warning("Fresh-frame MD of the final student became unphysical at %s", line)
            if frames:
                path = output / "fresh_frames.extxyz"
                path.unlink(missing_ok=True)
                labelled = read_labelled(label_structures(frames, teacher, path, progress=False))
                fresh = evaluate_structures(student, labelled, metric_groups_key="config_type", source=str(path))
                fresh_parity = fresh.parity
                metrics.update({f"fresh/{name}": value for name, value in fresh.metrics.items()})
                metrics["fresh/teacher_calls"] = float(total_teacher_calls(labelled))
        times["fresh_s"] = time.perf_counter() - clock
        if config.observables is not None:
            clock = time.perf_counter()
            from .observables import observables_report

            # Finite-difference frequencies and EOS fits need float64 energies: float32 rounding would be measured.
            precise = StudentCalculator(student, dtype=torch.float64)
            metrics.update(observables_report(precise, teacher, reference, output, seed=seed, **config.observables))
            times["observables_s"] = time.perf_counter() - clock
        if shared:
            here = _gate_job(gate_task(trajectories[1::2]))
    outcomes, compiled = gate_result()
    gate_metrics, gate_reasons, frames = combine_trajectories(
        outcomes + here[0], cell, target_temperatures, config.gate, min_distance_bound, pair_bounds
    )
    gate_metrics["compiled"] = min((c for c in (compiled, here[1]) if c is not None), default=0.0)
    failure_frames = _failure_copies(frames, gate_metrics["temperature_K"])
    metrics.update({f"gate/{name}": value for name, value in gate_metrics.items()})
    failure_path = output / GATE_FAILURE_FRAMES
    failure_path.unlink(missing_ok=True)  # a rerun's file must not speak of another student
    if failure_frames:
        from ase.io import write

        write(failure_path, failure_frames, format="extxyz")
        metrics["gate/failure_frames"] = float(len(failure_frames))
    times["gate_s"] = gate_metrics["seconds"]

    curve: list[tuple[float, float, str]] = []
    rounds: list[dict[str, Any]] = []
    if loop is not None:
        metrics.update(loop.metrics())
        rounds = loop.rounds
        curve = [(calls, ratio, f"round {i + 1}") for i, (calls, ratio) in enumerate(loop.learning_curve())]
    if refined:
        metrics.update(refined)
        if "teacher_calls/train" in metrics:
            metrics["teacher_calls/train"] += refined.get("refine/teacher_calls", 0)
    if loop is not None and "fresh/force_mae_rel" in metrics:
        curve.append((metrics["teacher_calls/train"], metrics["fresh/force_mae_rel"], "final"))
    metrics.update({f"time/report/{name}": round(value, 2) for name, value in times.items()})

    outcome, reasons = verdict(gate_reasons, metrics, config.bounds)
    metrics["verdict"] = outcome
    metrics["reasons"] = reasons

    plot = parity_plot(
        test.parity,
        output / "parity.png",
        f"student vs teacher, {len(test_structures)} test structures",
        reference_label="teacher",
        predicted_label="student",
        label="sampled test",
        overlay={"fresh frames": fresh_parity} if fresh_parity else None,
    )
    if plot is not None:
        log.info("Parity plot: %s", plot)
    target = loop_target(loop)
    learning_curve_plot(curve, output / "learning_curve.png", target)
    report = {**metrics, "rounds": rounds, "learning_curve": curve}
    if outcome == "fail":
        report["advice"] = advice(reasons)
    (output / "distill_report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return metrics


def loop_target(loop: LoopResult | None) -> float | None:
    """The loop's fresh-frame target (for the learning-curve plot), if there was a loop."""
    return getattr(loop, "target_force_ratio", None) if loop is not None else None


def print_report(metrics: dict[str, Any], console: Any | None = None) -> None:
    """The metrics of :func:`distillation_report` as a rich table, with units."""
    from rich.console import Console

    from ..cli import print_metrics

    shown = {name: value for name, value in metrics.items() if name != "reasons"}
    print_metrics(shown, "Student vs teacher", console=console or Console())
    for reason in metrics.get("reasons", []):
        (console or Console()).print(f"  fail: {reason}")
