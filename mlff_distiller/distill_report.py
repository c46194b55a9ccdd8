"""How good and how fast a distilled student is, next to its teacher: accuracy, speed and MD stability.

:func:`distillation_report` takes a trained student, the teacher (an ASE calculator) and held-out
teacher-labelled structures, and measures

- accuracy against the teacher's labels: energy MAE (meV/atom), force MAE and RMSE (meV/Å) and, when the
  structures carry Hessian rows, the Hessian-row MAE (meV/Å²);
- speed: single-point energy + forces per second through the ASE calculator interface, teacher and
  student, on the same structures (periodic systems: supercells of about 32 and 256 atoms);
- stability: an NVE (velocity Verlet) run with the student, its energy drift (meV/atom/ps, slope of a
  linear fit) and whether it stayed physical (finite energies, no two atoms closer than a bound);

writes a parity plot (``parity.png``, needs matplotlib) and ``distill_report.json`` into ``output_dir``
and returns the metrics. :func:`print_report` shows them as a table.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import keys
from .data.batch import collate_atoms
from .data.dataset import atoms_to_graph, hessian_rows_of
from .losses.hessian import row_slots, student_hessian_entries

log = logging.getLogger(__name__)

SPEED_SIZES = (32, 256)
"""Atoms in the structures timed for speed (periodic systems; at least this many)."""
MIN_DISTANCE_FRACTION = 0.6
"""Default MD bound: this fraction of the smallest interatomic distance in the held-out structures."""


def _labelled(atoms: Any) -> Any:
    """A copy with the ``_energy`` / ``_forces`` (/ Hessian rows) entries :func:`atoms_to_graph` reads."""
    out = atoms.copy()
    if "_energy" not in atoms.info:
        out.info["_energy"] = float(atoms.get_potential_energy())
        out.arrays["_forces"] = np.asarray(atoms.get_forces(), dtype=np.float64)
    out.info.pop("_stress", None)
    rows = hessian_rows_of(atoms)
    if rows is not None:
        out.info["_hessian_row_coord"], out.info["_hessian_rows"] = rows
    return out


def _frozen_copy(student: nn.Module) -> nn.Module:
    model = copy.deepcopy(student).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if hasattr(model, "compute_stress"):
        model.compute_stress = False
    return model


def evaluate_against_labels(
    student: nn.Module, structures: Sequence[Any], batch_size: int = 16
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Student vs the stored (teacher) labels of ``structures``: (metrics, parity data).

    Metrics: ``energy_mae_per_atom`` (meV/atom), ``force_mae``, ``force_rmse`` (meV/Å), over all
    structures and force components, and ``hessian_mae`` (meV/Å², over all stored row entries) when rows
    exist. Parity data: per-atom energies and force components, teacher and student, eV and eV/Å.
    """
    model = _frozen_copy(student)
    dtype = next(model.parameters()).dtype
    graphs = [atoms_to_graph(_labelled(atoms), model.cutoff, dtype=dtype) for atoms in structures]
    energy, energy_ref, forces, forces_ref, hessian_errors = [], [], [], [], []
    for start in range(0, len(graphs), batch_size):
        batch = collate_atoms(graphs[start : start + batch_size])
        positions = batch[keys.POSITIONS].detach().requires_grad_(keys.HESSIAN_ROWS in batch)
        out = model(batch.replace(**{keys.POSITIONS: positions}))
        atoms = batch[keys.NUM_ATOMS].to(dtype)
        energy.append((out[keys.ENERGY].detach() / atoms).double())
        energy_ref.append((batch[keys.ENERGY] / atoms).double())
        forces.append(out[keys.FORCES].detach().double().reshape(-1))
        forces_ref.append(batch[keys.FORCES].double().reshape(-1))
        if keys.HESSIAN_ROWS in batch:
            structure = batch[keys.BATCH][batch[keys.HESSIAN_ROW_COORD] // 3]
            slots = row_slots(structure, structure.shape[0], None)
            entries = student_hessian_entries(
                out[keys.FORCES], positions, batch, slots, int(slots.max()) + 1, create_graph=False
            )
            hessian_errors.append((entries.detach() - batch[keys.HESSIAN_ROWS]).double())
    parity = {
        "energy_per_atom_teacher": torch.cat(energy_ref).numpy(),
        "energy_per_atom_student": torch.cat(energy).numpy(),
        "forces_teacher": torch.cat(forces_ref).numpy(),
        "forces_student": torch.cat(forces).numpy(),
    }
    force_error = parity["forces_student"] - parity["forces_teacher"]
    metrics = {
        "energy_mae_per_atom": 1e3
        * float(np.abs(parity["energy_per_atom_student"] - parity["energy_per_atom_teacher"]).mean()),
        "force_mae": 1e3 * float(np.abs(force_error).mean()),
        "force_rmse": 1e3 * float(np.sqrt((force_error**2).mean())),
    }
    if hessian_errors:
        metrics["hessian_mae"] = 1e3 * float(torch.cat(hessian_errors).abs().mean())
    return metrics, parity


def speed_structures(reference: Any, sizes: Sequence[int] = SPEED_SIZES) -> list[Any]:
    """Supercells of a periodic ``reference`` with at least each of ``sizes`` atoms (the cell itself when it
    is big enough); a non-periodic one is returned alone, as it is."""
    from .teachers.structures import supercell

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


def _min_distance(atoms: Any) -> float:
    if len(atoms) < 2:
        return math.inf
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    return float(distances[np.triu_indices(len(atoms), k=1)].min())


def nve_stability(
    calculator: Any,
    atoms: Any,
    time_ps: float = 1.0,
    timestep_fs: float | None = None,
    temperature_K: float = 300.0,
    min_distance_bound: float = 0.0,
    record_every: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Run NVE (velocity Verlet) MD from ``atoms`` with Maxwell-Boltzmann velocities at ``temperature_K``.

    ``timestep_fs`` None: 0.5 fs with hydrogen, else 2 fs. Returns ``energy_drift`` (meV/atom/ps, slope of
    a linear fit of the total energy per atom), ``max_energy_deviation`` (meV/atom), ``min_distance`` (Å,
    over recorded frames), ``stable`` (1.0 when every energy is finite and ``min_distance`` stays above
    ``min_distance_bound``, else 0.0; a run that blows up stops early) and the run's settings.
    """
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from .teachers.structures import default_timestep_fs, maxwell_boltzmann_momenta

    atoms = atoms.copy()
    atoms.calc = calculator
    step_fs = timestep_fs if timestep_fs is not None else default_timestep_fs(atoms)
    steps = max(1, int(round(1000.0 * time_ps / step_fs)))
    atoms.set_momenta(maxwell_boltzmann_momenta(atoms, temperature_K, np.random.default_rng(seed)))
    dynamics = VelocityVerlet(atoms, timestep=step_fs * units.fs)
    times, energies, min_distance, physical = [], [], math.inf, True
    for done in range(0, steps + 1, record_every):
        if done:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a run that blows up
                dynamics.run(record_every)
        energy = float(atoms.get_total_energy()) / len(atoms)
        min_distance = min(min_distance, _min_distance(atoms))
        times.append(done * step_fs / 1000.0)
        energies.append(energy)
        if not math.isfinite(energy) or min_distance < min_distance_bound:
            physical = False
            break
    times_array, energies_array = np.array(times), np.array(energies)
    finite = np.isfinite(energies_array)
    drift = float(np.polyfit(times_array[finite], energies_array[finite], 1)[0]) * 1e3 if finite.sum() > 1 else math.nan
    return {
        "time_ps": times[-1],
        "timestep_fs": step_fs,
        "temperature_K": temperature_K,
        "num_atoms": float(len(atoms)),
        "energy_drift": drift,
        "max_energy_deviation": 1e3 * float(np.abs(energies_array[finite] - energies_array[0]).max()),
        "min_distance": min_distance,
        "min_distance_bound": min_distance_bound,
        "stable": 1.0 if physical else 0.0,
    }


def parity_plot(parity: dict[str, np.ndarray], path: str | os.PathLike[str], title: str = "") -> Path | None:
    """Student vs teacher energies per atom and force components, as a PNG; None (with a warning) when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no parity plot (pip install matplotlib).")
        return None
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    panels = (
        ("energy_per_atom", "energy (eV/atom)", "meV/atom"),
        ("forces", "force components (eV/Å)", "meV/Å"),
    )
    for axis, (name, label, unit) in zip(axes, panels):
        teacher, student = parity[f"{name}_teacher"], parity[f"{name}_student"]
        axis.set_title(f"MAE {1e3 * float(np.abs(student - teacher).mean()):.3g} {unit}")
        low, high = float(min(teacher.min(), student.min())), float(max(teacher.max(), student.max()))
        axis.plot([low, high], [low, high], color="0.6", linewidth=1)
        axis.scatter(teacher, student, s=4, alpha=0.5, linewidths=0)
        axis.set_xlabel(f"teacher {label}")
        axis.set_ylabel(f"student {label}")
        axis.set_aspect("equal", adjustable="datalim")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def distillation_report(
    student: nn.Module,
    teacher: Any,
    test_structures: Sequence[Any],
    output_dir: str | os.PathLike[str],
    speed_reference: Any | None = None,
    speed_sizes: Sequence[int] = SPEED_SIZES,
    speed_seconds: float = 1.0,
    student_dtype: torch.dtype = torch.float32,
    md_time_ps: float = 1.0,
    md_timestep_fs: float | None = None,
    md_temperature_K: float = 300.0,
    min_distance_bound: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy, speed and MD stability of ``student`` next to ``teacher`` (see the module docstring).

    Args:
        student: a trained atomistic student (has ``cutoff``); not modified.
        teacher: the teacher's ASE calculator.
        test_structures: held-out structures with the teacher's labels (calculator results or the
            ``_energy``/``_forces`` entries of :func:`~mlff_distiller.data.dataset.read_labelled_structures`),
            optionally with Hessian rows.
        output_dir: where ``parity.png`` and ``distill_report.json`` go.
        speed_reference: the structure whose supercells are timed and from which MD starts (default: the
            first test structure).
        speed_sizes: atoms in the timed supercells (at least; periodic systems only).
        speed_seconds: timing budget per calculator and size.
        student_dtype: precision of the student in the speed and MD runs (:class:`StudentCalculator`).
        md_time_ps, md_timestep_fs, md_temperature_K: the NVE run (timestep None: 0.5 fs with H, else 2 fs).
        min_distance_bound: Å; default ``MIN_DISTANCE_FRACTION`` x the smallest distance in the test set.

    Returns metrics: ``test/energy_mae_per_atom``, ``test/force_mae``, ``test/force_rmse``,
    ``test/hessian_mae`` (with rows), ``speed/<size>/{num_atoms,teacher_per_s,student_per_s,speedup}``,
    ``md/{energy_drift,max_energy_deviation,min_distance,min_distance_bound,stable,time_ps,...}``.
    """
    from .calculator import StudentCalculator

    if not test_structures:
        raise ValueError("distillation_report needs at least one held-out structure.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    accuracy, parity = evaluate_against_labels(student, test_structures)
    metrics: dict[str, float] = {f"test/{name}": value for name, value in accuracy.items()}
    metrics["test/num_structures"] = float(len(test_structures))

    calculator = StudentCalculator(student, dtype=student_dtype)
    reference = speed_reference if speed_reference is not None else test_structures[0]
    speed_atoms = speed_structures(reference, speed_sizes)
    labels = speed_sizes if reference.pbc.all() else [len(reference)]
    for size, atoms in zip(labels, speed_atoms):
        teacher_rate = calls_per_second(teacher, atoms, speed_seconds)
        student_rate = calls_per_second(calculator, atoms, speed_seconds)
        metrics[f"speed/{size}/num_atoms"] = float(len(atoms))
        metrics[f"speed/{size}/teacher_per_s"] = teacher_rate
        metrics[f"speed/{size}/student_per_s"] = student_rate
        metrics[f"speed/{size}/speedup"] = student_rate / teacher_rate

    if min_distance_bound is None:
        min_distance_bound = MIN_DISTANCE_FRACTION * min(_min_distance(atoms) for atoms in test_structures)
    md = nve_stability(
        calculator, speed_atoms[0], md_time_ps, md_timestep_fs, md_temperature_K, min_distance_bound, seed=seed
    )
    metrics.update({f"md/{name}": value for name, value in md.items()})

    plot = parity_plot(parity, output / "parity.png", f"student vs teacher, {len(test_structures)} test structures")
    if plot is not None:
        log.info("Parity plot: %s", plot)
    (output / "distill_report.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def print_report(metrics: dict[str, float], console: Any | None = None) -> None:
    """The metrics of :func:`distillation_report` as a rich table, with units."""
    from rich.console import Console

    from .cli import print_metrics

    print_metrics(metrics, "Student vs teacher", console=console or Console())
