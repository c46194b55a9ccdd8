"""Physical observables of a force field, student next to teacher: EOS, vibrational frequencies, RDF.

Every function takes any ASE calculator (a teacher, a :class:`~mlff_distiller.StudentCalculator`), so
one protocol measures both, and :func:`observables_report` runs the ones that suit the system:

- **equation of state** (crystals): energies of isotropically strained copies of a cell, fitted with
  ASE's ``EquationOfState`` (Birch-Murnaghan): equilibrium volume and bulk modulus
  (:func:`equation_of_state`, :func:`compare_eos`);
- **vibrational frequencies** by central finite differences of the forces: for a periodic cell the
  Gamma-point modes of that cell (ASE's ``Phonons`` with a 1x1x1 supercell, i.e. the mass-weighted
  Hessian of the cell with its periodic images); for an isolated molecule ASE's ``Vibrations``. The
  rigid-body modes (3 translations; plus 3, or 2 when linear, rotations of an isolated molecule) are
  removed, imaginary modes are kept as negative numbers and counted (:func:`vibrational_frequencies`,
  :func:`compare_frequencies`);
- **radial distribution function** from a Langevin NVT run (ASE MD), per element pair, with ASE's
  ``get_rdf`` (:func:`langevin_frames`, :func:`radial_distribution`, :func:`rdf_difference`).

The plots (:func:`plot_equation_of_state`, :func:`plot_frequencies`, :func:`plot_rdf`) write PNGs with
matplotlib's Agg backend. Units: Å, eV, GPa, cm⁻¹, K, fs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..teachers.structures import system_kind

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

KINDS = ("auto", "crystal", "liquid", "molecule")
"""System kinds :func:`observables_report` knows (``auto``: :func:`system_kind` decides)."""
OBSERVABLES = ("eos", "frequencies", "rdf")
DEFAULT_OBSERVABLES = {
    "crystal": ("eos", "frequencies"),
    "liquid": ("frequencies", "rdf"),
    "molecule": ("frequencies",),
}
"""What :func:`observables_report` runs for each kind unless told (``observables=[...]``)."""
PREFIX = "observables/"


# ---------------------------------------------------------------------- helpers
def _bare(atoms: Atoms) -> Atoms:
    """A copy without calculator, constraints or momenta: what every measurement starts from."""
    from ase import Atoms as AseAtoms

    return AseAtoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def _max_force(calculator: Any, atoms: Atoms) -> float:
    atoms = _bare(atoms)
    atoms.calc = calculator
    return float(np.linalg.norm(atoms.get_forces(), axis=1).max())


def relax_positions(calculator: Any, atoms: Atoms, fmax: float = 0.01, steps: int = 200) -> tuple[Atoms, float]:
    """Positions relaxed with ``calculator`` (ASE's BFGS, cell fixed) to ``fmax`` eV/Å or ``steps`` steps.

    Returns (relaxed copy, largest remaining force in eV/Å); an unconverged relaxation is logged, not raised:
    its residual force is part of the result.
    """
    from ase.optimize import BFGS

    relaxed = _bare(atoms)
    relaxed.calc = calculator
    if steps > 0:
        BFGS(relaxed, logfile=None).run(fmax=fmax, steps=steps)
    residual = float(np.linalg.norm(relaxed.get_forces(), axis=1).max())
    if steps > 0 and residual > fmax:
        log.warning("Relaxation stopped after %d steps at max force %.3g eV/Å (asked %.3g).", steps, residual, fmax)
    return _bare(relaxed), residual


# ---------------------------------------------------------------------- equation of state
@dataclass(frozen=True)
class EquationOfStateResult:
    """Energies of isotropically strained copies of one cell and their Birch-Murnaghan fit."""

    volumes: np.ndarray
    """Cell volumes (Å³), ascending."""
    energies: np.ndarray
    """Energies of the cell (eV) at ``volumes``."""
    v0: float
    """Fitted equilibrium volume of the cell (Å³)."""
    e0: float
    """Fitted minimum energy of the cell (eV)."""
    bulk_modulus_GPa: float
    num_atoms: int
    fit_volumes: np.ndarray
    """Volumes (Å³) and energies (eV) of the fitted curve, for plots."""
    fit_energies: np.ndarray

    @property
    def v0_in_range(self) -> bool:
        """Whether ``v0`` lies inside the sampled volumes (else the fit extrapolates)."""
        return bool(self.volumes.min() <= self.v0 <= self.volumes.max())


def eos_volumes(atoms: Atoms, points: int = 7, max_volume_strain: float = 0.06) -> np.ndarray:
    """``points`` volumes evenly spread over ``V (1 ± max_volume_strain)`` around the cell volume V (Å³)."""
    if points < 5:
        raise ValueError(f"eos_points={points} is too few for a 4-parameter Birch-Murnaghan fit; use 5 or more.")
    if not 0 < max_volume_strain < 0.5:
        raise ValueError(f"eos_max_volume_strain={max_volume_strain} is invalid; accepted: 0 < strain < 0.5.")
    return atoms.get_volume() * (1.0 + np.linspace(-max_volume_strain, max_volume_strain, points))


def equation_of_state(
    calculator: Any, atoms: Atoms, points: int = 7, max_volume_strain: float = 0.06
) -> EquationOfStateResult:
    """Energy vs volume of ``atoms`` (periodic) under isotropic strain, fitted with ``ase.eos.EquationOfState``.

    Protocol: the cell is scaled to each of :func:`eos_volumes` with the fractional coordinates fixed
    (no relaxation at each volume), so student and teacher see exactly the same structures. For
    elemental fcc/bcc/hcp-ideal cells this is the relaxed EOS (positions are fixed by symmetry); for
    cells with internal degrees of freedom (alloys, molecules) it is the clamped-ion EOS, whose bulk
    modulus bounds the relaxed one from above. Start from relaxed positions.
    """
    from ase import units
    from ase.eos import EquationOfState

    if not atoms.pbc.all():
        raise ValueError("The equation of state needs a periodic cell (pbc all True).")
    volumes = eos_volumes(atoms, points, max_volume_strain)
    energies = []
    for volume in volumes:
        strained = _bare(atoms)
        strained.set_cell(atoms.cell.array * (volume / atoms.get_volume()) ** (1.0 / 3.0), scale_atoms=True)
        strained.calc = calculator
        energy = float(strained.get_potential_energy())
        if not math.isfinite(energy):
            raise ValueError(f"The calculator returned energy {energy} at volume {volume:.3f} Å³; no EOS fit.")
        energies.append(energy)
    energies_array = np.array(energies)
    eos = EquationOfState(volumes, energies_array, eos="birchmurnaghan")
    v0, e0, bulk_modulus = eos.fit(warn=False)
    fit_volumes, fit_energies = eos.getplotdata()[4:6]
    return EquationOfStateResult(
        volumes=volumes,
        energies=energies_array,
        v0=float(v0),
        e0=float(e0),
        bulk_modulus_GPa=float(bulk_modulus / units.kJ * 1.0e24),
        num_atoms=len(atoms),
        fit_volumes=np.asarray(fit_volumes),
        fit_energies=np.asarray(fit_energies),
    )


def compare_eos(student: EquationOfStateResult, teacher: EquationOfStateResult) -> dict[str, float]:
    """Metrics (names without prefix): bulk moduli (GPa), equilibrium volumes (Å³/atom), their relative
    errors ``|student - teacher| / teacher``, and ``eos_extrapolated`` (1.0 when a fitted V0 lies outside
    the sampled volumes: widen ``eos_max_volume_strain``)."""
    per_atom = teacher.num_atoms
    return {
        "bulk_modulus_teacher_GPa": teacher.bulk_modulus_GPa,
        "bulk_modulus_student_GPa": student.bulk_modulus_GPa,
        "bulk_modulus_rel_error": abs(student.bulk_modulus_GPa - teacher.bulk_modulus_GPa) / teacher.bulk_modulus_GPa,
        "v0_teacher_A3_per_atom": teacher.v0 / per_atom,
        "v0_student_A3_per_atom": student.v0 / per_atom,
        "v0_rel_error": abs(student.v0 - teacher.v0) / teacher.v0,
        "eos_extrapolated": 0.0 if (student.v0_in_range and teacher.v0_in_range) else 1.0,
    }


# ---------------------------------------------------------------------- vibrational frequencies
@dataclass(frozen=True)
class FrequencyResult:
    """Harmonic frequencies at one geometry; imaginary modes are negative numbers."""

    frequencies_cm1: np.ndarray
    """Vibrational modes (cm⁻¹), ascending, rigid-body modes removed."""
    rigid_body_cm1: np.ndarray
    """The removed modes (cm⁻¹): near zero at a minimum; large values mean they mixed with real modes."""
    num_atoms: int
    method: str
    """``"phonons-gamma"`` (periodic) or ``"vibrations"`` (isolated)."""

    @property
    def num_imaginary(self) -> int:
        return int((self.frequencies_cm1 < 0).sum())


def _rigid_body_basis(atoms: Atoms) -> np.ndarray:
    """Orthonormal mass-weighted displacements (3N x k) of the rigid-body motions: translations, and for a
    non-periodic structure rotations about the centre of mass (k = 6, 5 for a linear molecule)."""
    masses = atoms.get_masses()
    weights = np.sqrt(masses)[:, None]
    vectors = [(weights * np.eye(3)[axis]).ravel() for axis in range(3)]
    if not atoms.pbc.any():
        arms = atoms.positions - atoms.get_center_of_mass()
        vectors += [(weights * np.cross(np.eye(3)[axis], arms)).ravel() for axis in range(3)]
    u, s, _ = np.linalg.svd(np.stack(vectors, axis=1), full_matrices=False)
    return u[:, s > 1e-6 * s.max()]


def _drop_rigid_body(atoms: Atoms, energies_eV: np.ndarray, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ASE's (energies, modes) into (vibrations, rigid-body modes), in cm⁻¹: the k modes with the
    largest overlap with the rigid-body subspace go. ASE's modes are Cartesian (mass^-1/2 x eigenvector)."""
    from ase import units

    eigenvectors = (modes * np.sqrt(atoms.get_masses())[None, :, None]).reshape(len(energies_eV), -1)
    eigenvectors /= np.linalg.norm(eigenvectors, axis=1, keepdims=True)
    basis = _rigid_body_basis(atoms)
    overlap = ((eigenvectors @ basis) ** 2).sum(axis=1)
    rigid = np.argsort(overlap)[::-1][: basis.shape[1]]
    keep = np.setdiff1d(np.arange(len(energies_eV)), rigid)
    frequencies = energies_eV / units.invcm
    return np.sort(frequencies[keep]), np.sort(frequencies[rigid])


def vibrational_frequencies(calculator: Any, atoms: Atoms, delta: float = 0.01) -> FrequencyResult:
    """Harmonic frequencies of ``atoms`` at its given geometry, by central finite differences (``delta`` Å).

    Periodic: ASE's ``Phonons`` on the cell itself (1x1x1 supercell), read with its default force-constant
    treatment (Frederiksen correction, symmetrised, acoustic sum rule), then its dynamical matrix at
    Gamma: the modes of the cell with its periodic images, e.g. the zone-folded phonons of a crystal
    supercell or the Gamma modes of a liquid box. Isolated (no pbc): ASE's ``Vibrations``. Costs 6N+1
    (6N) calls. The rigid-body modes are removed (:attr:`FrequencyResult.rigid_body_cm1`); imaginary
    modes stay, as negative frequencies.
    """
    from ase.phonons import Phonons
    from ase.vibrations import Vibrations

    atoms = _bare(atoms)
    if not (atoms.pbc.all() or not atoms.pbc.any()):
        raise ValueError(f"Frequencies need a fully periodic or a non-periodic structure; got pbc={atoms.pbc}.")
    with tempfile.TemporaryDirectory(prefix="mlff_frequencies_") as scratch:
        if atoms.pbc.all():
            phonons = Phonons(atoms, calculator, supercell=(1, 1, 1), delta=delta, name=str(Path(scratch) / "phonon"))
            phonons.run()
            phonons.read()
            energies, modes = phonons.band_structure([np.zeros(3)], modes=True, verbose=False)
            energies, modes, method = energies[0], modes[0], "phonons-gamma"
        else:
            atoms.calc = calculator
            vibrations = Vibrations(atoms, delta=delta, name=str(Path(scratch) / "vib"))
            vibrations.run()
            complex_energies, modes = vibrations.get_vibrations().get_energies_and_modes()
            # ASE gives sqrt of a negative eigenvalue as an imaginary number; keep its size with a minus sign.
            energies = np.where(
                np.abs(complex_energies.imag) > 0, -np.abs(complex_energies.imag), complex_energies.real
            )
            method = "vibrations"
    if not np.all(np.isfinite(energies)):
        raise ValueError("The calculator's forces gave non-finite force constants; no frequencies.")
    frequencies, rigid = _drop_rigid_body(atoms, np.asarray(energies, dtype=float), np.asarray(modes))
    if not len(frequencies):
        raise ValueError(
            f"A {len(atoms)}-atom {'cell' if atoms.pbc.all() else 'structure'} has only rigid-body modes "
            "(at Gamma); use a supercell."
        )
    return FrequencyResult(frequencies, rigid, len(atoms), method)


def compare_frequencies(student: FrequencyResult, teacher: FrequencyResult) -> dict[str, float]:
    """Metrics (names without prefix) of two spectra of the same structure, modes paired in sorted order.

    ``frequency_mae_cm1`` = mean over modes i of |ω_student,i - ω_teacher,i| (both sorted ascending, imaginary
    modes negative; sorted pairing is the optimal one-to-one matching of two lists of numbers, it compares
    spectra, not eigenvectors); ``frequency_mean_teacher_cm1`` = mean of |ω_teacher,i|;
    ``frequency_mae_rel`` = their ratio (the 3 % target); ``frequency_max_error_cm1``; imaginary-mode counts.
    """
    if len(student.frequencies_cm1) != len(teacher.frequencies_cm1):
        raise ValueError(
            f"Spectra of different sizes ({len(student.frequencies_cm1)} vs {len(teacher.frequencies_cm1)} modes): "
            "student and teacher frequencies must come from the same structure."
        )
    errors = np.abs(student.frequencies_cm1 - teacher.frequencies_cm1)
    mean_teacher = float(np.abs(teacher.frequencies_cm1).mean())
    return {
        "frequency_mae_cm1": float(errors.mean()),
        "frequency_mean_teacher_cm1": mean_teacher,
        "frequency_mae_rel": float(errors.mean()) / mean_teacher,
        "frequency_max_error_cm1": float(errors.max()),
        "frequency_num_modes": float(len(errors)),
        "imaginary_modes_teacher": float(teacher.num_imaginary),
        "imaginary_modes_student": float(student.num_imaginary),
    }


# ---------------------------------------------------------------------- MD and radial distribution
def langevin_frames(
    calculator: Any,
    atoms: Atoms,
    steps: int = 200,
    timestep_fs: float | None = None,
    temperature_K: float = 300.0,
    friction_per_fs: float = 0.02,
    equilibration_steps: int = 100,
    interval: int = 10,
    seed: int = 0,
) -> list[Atoms]:
    """Frames of a Langevin NVT run driven by ``calculator`` through the package's MD driver
    (:func:`mlff_distiller.md.driver.run_md`, ASE's integrator): ``equilibration_steps`` steps, then one frame
    every ``interval`` steps for ``steps`` steps.

    Velocities and the thermostat's noise are seeded by ``seed``, so the same calculator gives the same frames.
    ``timestep_fs`` None: 0.5 fs with hydrogen, else 2 fs. A run that becomes unstable in the driver's sense
    (non-finite energy or positions, atoms closer than half the starting closest approach) ends there (logged):
    the frames before it are returned, and fewer frames than asked is the signal.
    """
    from ..md.driver import MDSettings, run_md
    from ..teachers.structures import default_timestep_fs

    if steps < interval or interval < 1 or equilibration_steps < 0:
        raise ValueError(
            f"MD needs steps >= interval >= 1 and equilibration_steps >= 0; got steps={steps}, interval={interval}, "
            f"equilibration_steps={equilibration_steps}."
        )
    start = _bare(atoms)
    settings = MDSettings(
        ensemble="nvt",
        temperature_K=temperature_K,
        timestep_fs=timestep_fs if timestep_fs is not None else default_timestep_fs(start),
        steps=equilibration_steps + steps,
        friction_per_ps=1000.0 * friction_per_fs,
        thermo_interval=interval,
        write_interval=interval,
        seed=seed,
        equilibration_steps=equilibration_steps,
    )
    summary = run_md(calculator, start, settings, keep_frames=True)
    if not summary.stable:
        log.warning("MD stopped: %s.", summary.reason)
    return [_bare(frame) for frame in summary.frames]


@dataclass(frozen=True)
class RDFResult:
    """Radial distribution functions averaged over frames: ``g["total"]`` and one per element pair."""

    r: np.ndarray
    """Bin centres (Å)."""
    g: dict[str, np.ndarray] = field(default_factory=dict)
    """``"total"`` and ``"A-B"`` (symbols in alphabetical order, each unordered pair once)."""
    num_frames: int = 0

    def peak_position(self, pair: str = "total") -> float:
        """Where ``g[pair]`` is highest (Å): the first coordination shell of a liquid or a crystal."""
        return float(self.r[int(np.argmax(self.g[pair]))])


def rdf_pairs(atoms: Atoms) -> list[tuple[str, str]]:
    """Element pairs of ``atoms`` in alphabetical order, e.g. ``[("H", "H"), ("H", "O"), ("O", "O")]``."""
    symbols = sorted(set(atoms.get_chemical_symbols()))
    return [(a, b) for i, a in enumerate(symbols) for b in symbols[i:]]


def max_rdf_radius(atoms: Atoms) -> float:
    """The longest ``rmax`` (Å) ASE's ``get_rdf`` accepts for this periodic cell: half its smallest height
    (so every pair closer than ``rmax`` is counted once, by its minimum image)."""
    return 0.5 / float(np.linalg.norm(atoms.cell.reciprocal(), axis=1).max())


def radial_distribution(frames: Sequence[Atoms], rmax: float | None = None, bin_width: float = 0.05) -> RDFResult:
    """g(r) of periodic ``frames`` (same composition and cell), total and per element pair, with ASE's
    ``get_rdf``, averaged over frames. ``rmax`` None: ASE's recommendation for the first frame's cell (0.99 x
    :func:`max_rdf_radius`, at most 5 Å)."""
    from ase.geometry.rdf import get_rdf, get_recommended_r_max

    if not frames:
        raise ValueError("radial_distribution needs at least one frame.")
    allowed = max_rdf_radius(frames[0])
    rmax = float(get_recommended_r_max(frames[0].cell, frames[0].pbc)) if rmax is None else float(rmax)
    if not 0 < rmax < allowed:
        raise ValueError(
            f"rdf_rmax={rmax} Å is invalid for this cell; accepted: 0 < rmax < {allowed:.3f} Å (half its height)."
        )
    nbins = max(1, int(round(rmax / bin_width)))
    pairs = rdf_pairs(frames[0])
    sums = {"total": np.zeros(nbins), **{f"{a}-{b}": np.zeros(nbins) for a, b in pairs}}
    r = None
    for atoms in frames:
        distances = atoms.get_all_distances(mic=True)  # minimum image is exact below half the cell height
        g, r = get_rdf(atoms, rmax, nbins, distance_matrix=distances)
        sums["total"] += g
        for a, b in pairs:
            sums[f"{a}-{b}"] += get_rdf(atoms, rmax, nbins, distance_matrix=distances, elements=(a, b), no_dists=True)
    return RDFResult(r=np.asarray(r), g={k: v / len(frames) for k, v in sums.items()}, num_frames=len(frames))


def rdf_difference(student: np.ndarray, teacher: np.ndarray) -> float:
    """∫|g_student - g_teacher| dr / ∫ g_teacher dr over the common bins: 0 for identical curves, 0.1 when they
    differ by a tenth of the teacher's area (unitless; both on the same uniform bins)."""
    return float(np.abs(student - teacher).sum() / teacher.sum())


# ---------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_equation_of_state(
    student: EquationOfStateResult, teacher: EquationOfStateResult, path: str | os.PathLike[str]
) -> Path:
    """Energy per atom relative to each fit's minimum vs volume per atom, points and fits; returns the PNG path."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    # The student dashed and with small markers, so it stays visible where it covers the teacher.
    for label, result, color, line, marker in (
        ("teacher", teacher, "C0", "-", "o"),
        ("student", student, "C1", "--", "."),
    ):
        n = result.num_atoms
        axis.plot(result.volumes / n, (result.energies - result.e0) / n * 1e3, marker, color=color)
        axis.plot(
            result.fit_volumes / n,
            (result.fit_energies - result.e0) / n * 1e3,
            line,
            color=color,
            label=f"{label}: B = {result.bulk_modulus_GPa:.1f} GPa, V0 = {result.v0 / n:.3f} Å³/atom",
        )
    axis.set_xlabel("volume (Å³/atom)")
    axis.set_ylabel("E - E0 (meV/atom)")
    axis.legend(fontsize=8)
    axis.set_title("Equation of state (Birch-Murnaghan)")
    return _save(figure, path)


def plot_frequencies(student: FrequencyResult, teacher: FrequencyResult, path: str | os.PathLike[str]) -> Path:
    """Sorted spectra of both and a parity panel (imaginary modes below zero); returns the PNG path."""
    plt = _pyplot()
    figure, (spectra, parity) = plt.subplots(1, 2, figsize=(10, 4.2))
    index = np.arange(len(teacher.frequencies_cm1))
    spectra.plot(index, teacher.frequencies_cm1, "o", markerfacecolor="none", label="teacher")
    spectra.plot(index, student.frequencies_cm1, ".", label="student")
    spectra.axhline(0.0, color="0.6", linewidth=0.8)
    spectra.set_xlabel("mode (sorted)")
    spectra.set_ylabel("frequency (cm⁻¹; imaginary < 0)")
    spectra.legend()
    metrics = compare_frequencies(student, teacher)
    low = float(min(teacher.frequencies_cm1.min(), student.frequencies_cm1.min()))
    high = float(max(teacher.frequencies_cm1.max(), student.frequencies_cm1.max()))
    parity.plot([low, high], [low, high], color="0.6", linewidth=1)
    parity.scatter(teacher.frequencies_cm1, student.frequencies_cm1, s=8)
    parity.set_xlabel("teacher frequency (cm⁻¹)")
    parity.set_ylabel("student frequency (cm⁻¹)")
    parity.set_title(
        f"MAE {metrics['frequency_mae_cm1']:.3g} cm⁻¹ ({100 * metrics['frequency_mae_rel']:.2f} % of mean); "
        f"imaginary {teacher.num_imaginary}/{student.num_imaginary}",
        fontsize=9,
    )
    figure.suptitle(f"{teacher.method} modes, {teacher.num_atoms} atoms")
    return _save(figure, path)


def plot_rdf(student: RDFResult, teacher: RDFResult, path: str | os.PathLike[str]) -> Path:
    """g(r) overlaid, one panel for the total and one per element pair; returns the PNG path."""
    plt = _pyplot()
    names = list(teacher.g)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.plot(teacher.r, teacher.g[name], label="teacher")
        axis.plot(student.r, student.g[name], "--", label="student")
        axis.set_title(f"{name}: difference {rdf_difference(student.g[name], teacher.g[name]):.3f}", fontsize=9)
        axis.set_xlabel("r (Å)")
    axes[0][0].set_ylabel("g(r)")
    axes[0][0].legend()
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------- the report
def repeat_to(atoms: Atoms, min_atoms: int) -> Atoms:
    """``atoms`` repeated along its shortest (repeated) cell vector until it has at least ``min_atoms`` atoms."""
    repeat = np.ones(3, dtype=int)
    lengths = atoms.cell.lengths()
    while len(atoms) * repeat.prod() < min_atoms:
        repeat[int(np.argmin(lengths * repeat))] += 1
    return atoms.repeat(tuple(int(n) for n in repeat))


def _choose(kind: str, observables: Sequence[str] | None, reference: Atoms) -> tuple[str, tuple[str, ...]]:
    if kind not in KINDS:
        raise ValueError(f"observables kind={kind!r} is invalid; accepted: {', '.join(KINDS)}.")
    if reference.pbc.any() and not reference.pbc.all():
        raise ValueError(f"Observables need a fully periodic or a non-periodic structure; got pbc={reference.pbc}.")
    if kind == "auto":
        kind = system_kind(reference)
    elif (kind == "molecule") != (not reference.pbc.any()):
        raise ValueError(f"kind={kind!r} does not fit a reference structure with pbc={reference.pbc}.")
    chosen = tuple(observables) if observables is not None else DEFAULT_OBSERVABLES[kind]
    unknown = [name for name in chosen if name not in OBSERVABLES]
    if unknown:
        raise ValueError(f"observables={list(chosen)} has unknown names {unknown}; accepted: {', '.join(OBSERVABLES)}.")
    if kind == "molecule" and {"eos", "rdf"} & set(chosen):
        raise ValueError(f"observables={list(chosen)}: eos and rdf need a periodic cell; a molecule has frequencies.")
    return kind, chosen


def observables_report(
    student_calc: Any,
    teacher_calc: Any,
    reference_atoms: Atoms,
    output_dir: str | os.PathLike[str],
    kind: str = "auto",
    observables: Sequence[str] | None = None,
    relax_fmax: float = 0.01,
    relax_steps: int = 200,
    eos_points: int = 7,
    eos_max_volume_strain: float = 0.06,
    frequency_delta: float = 0.01,
    max_frequency_atoms: int = 64,
    md_atoms: Atoms | None = None,
    md_min_atoms: int = 0,
    md_steps: int = 200,
    md_equilibration_steps: int = 100,
    md_interval: int = 10,
    md_timestep_fs: float | None = None,
    md_temperature_K: float = 300.0,
    md_friction_per_fs: float = 0.02,
    rdf_rmax: float | None = None,
    rdf_bin_width: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Student vs teacher on the physical observables that suit ``reference_atoms``; plots into ``output_dir``.

    What runs: ``observables`` (a list of ``"eos"``, ``"frequencies"``, ``"rdf"``), by default by ``kind``
    (``auto`` asks :func:`system_kind`): a crystal gets EOS and frequencies, a liquid (periodic box of
    molecules) frequencies and RDF, an isolated molecule frequencies (:data:`DEFAULT_OBSERVABLES`).

    Protocol (the same for both calculators, and the teacher decides every geometry):

    1. the reference positions are relaxed with the **teacher** (BFGS, cell fixed; ``relax_fmax`` eV/Å,
       ``relax_steps``; 0 steps: used as given);
    2. EOS: both calculators on the same isotropically strained copies of that cell (fractional coordinates
       fixed, volumes V (1 ± ``eos_max_volume_strain``), ``eos_points``; :func:`equation_of_state`);
    3. frequencies: both at the teacher's minimum: the relaxed cell, scaled to the teacher's V0 and relaxed
       again when the EOS ran. Comparing each model at its own minimum would mix a geometry error into the
       curvature error; at the teacher's geometry the student may feel a small residual force
       (``reference_student_max_force_eV_A``), which is part of its error. Costs 6N+1 calls each, so a
       reference of more than ``max_frequency_atoms`` atoms is refused before any work;
    4. RDF: a Langevin run of each calculator from the same start and seed (``md_atoms`` when given, else the
       relaxed reference repeated to at least ``md_min_atoms`` atoms): ``md_equilibration_steps`` steps,
       then a frame every ``md_interval`` of ``md_steps`` steps at ``md_temperature_K``; g(r) up to
       ``rdf_rmax`` (None: 0.99 x half the smallest cell height, at most 5 Å), bins of ``rdf_bin_width`` Å.

    Returns flat metrics, all prefixed ``observables/``:

    - ``bulk_modulus_{teacher,student}_GPa``, ``bulk_modulus_rel_error``, ``v0_{teacher,student}_A3_per_atom``,
      ``v0_rel_error`` (relative errors are ``|student - teacher| / teacher``), ``eos_extrapolated`` (1.0 when
      a V0 lies outside the sampled volumes), ``reference_volume_offset`` (only when the reference cell was more
      than half the strain range off the teacher's V0: the volumes were then sampled again around that V0);
    - ``frequency_mae_cm1`` (mean over modes of |Δω|, modes sorted; rigid-body modes removed),
      ``frequency_mean_teacher_cm1`` (mean |ω_teacher|), ``frequency_mae_rel`` (their ratio),
      ``frequency_max_error_cm1``, ``frequency_num_modes``, ``imaginary_modes_{teacher,student}``;
    - ``rdf_difference`` (total g(r); :func:`rdf_difference`), ``rdf_difference_<A-B>`` per element pair,
      ``rdf_peak_{teacher,student}_A`` and ``rdf_peak_<A-B>_{teacher,student}_A`` (position of the highest
      maximum), ``rdf_frames_{teacher,student}`` (fewer student frames than teacher ones: its MD failed),
      ``rdf_rmax_A``, ``md_num_atoms``;
    - ``reference_max_force_eV_A`` (teacher, after relaxation), ``reference_student_max_force_eV_A``,
      ``num_atoms``, ``seconds_{relax,eos,frequencies,rdf}``.

    Writes ``eos.png``, ``frequencies.png``, ``rdf.png`` (what ran) and ``observables.json`` (the metrics and
    the curves) into ``output_dir``. All options are plain values, so Hydra can pass them from YAML.
    """
    reference = _bare(reference_atoms)
    kind, chosen = _choose(kind, observables, reference)
    if "frequencies" in chosen and len(reference) > max_frequency_atoms:
        raise ValueError(
            f"The reference structure has {len(reference)} atoms; finite-difference frequencies would cost "
            f"{6 * len(reference) + 1} calls per calculator (max_frequency_atoms={max_frequency_atoms}). Pass a "
            "smaller cell as reference_atoms (and a big one as md_atoms), or raise max_frequency_atoms."
        )
    if "rdf" in chosen and rdf_rmax is not None:
        start = md_atoms if md_atoms is not None else repeat_to(reference, md_min_atoms)
        if rdf_rmax >= max_rdf_radius(start):
            raise ValueError(
                f"rdf_rmax={rdf_rmax} Å is too long for the MD cell ({len(start)} atoms); accepted: below "
                f"{max_rdf_radius(start):.3f} Å. Raise md_min_atoms or pass a bigger md_atoms."
            )
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {"num_atoms": float(len(reference))}
    curves: dict[str, Any] = {"kind": kind, "observables": list(chosen)}
    log.info("Observables (%s: %s) on %d atoms.", kind, ", ".join(chosen), len(reference))

    started = time.perf_counter()
    relaxed, residual = relax_positions(teacher_calc, reference, relax_fmax, relax_steps)
    metrics["reference_max_force_eV_A"] = residual
    metrics["seconds_relax"] = time.perf_counter() - started

    geometry = relaxed
    if "eos" in chosen:
        started = time.perf_counter()
        eos_teacher = equation_of_state(teacher_calc, relaxed, eos_points, eos_max_volume_strain)
        if not eos_teacher.v0_in_range or abs(eos_teacher.v0 / relaxed.get_volume() - 1) > eos_max_volume_strain / 2:
            # The reference is far from the teacher's equilibrium volume (e.g. seeds built with another model's
            # lattice constant): sample again around the teacher's V0, so its fit interpolates.
            log.warning(
                "The reference cell is %.1f %% off the teacher's equilibrium volume; the EOS is sampled around "
                "the teacher's V0 (a student trained at the reference's density is tested outside its data).",
                100 * (eos_teacher.v0 / relaxed.get_volume() - 1),
            )
            metrics["reference_volume_offset"] = eos_teacher.v0 / relaxed.get_volume() - 1
            relaxed = _bare(relaxed)
            relaxed.set_cell(relaxed.cell.array * (eos_teacher.v0 / relaxed.get_volume()) ** (1 / 3), scale_atoms=True)
            relaxed, _ = relax_positions(teacher_calc, relaxed, relax_fmax, relax_steps)
            eos_teacher = equation_of_state(teacher_calc, relaxed, eos_points, eos_max_volume_strain)
        eos_student = equation_of_state(student_calc, relaxed, eos_points, eos_max_volume_strain)
        metrics.update(compare_eos(eos_student, eos_teacher))
        if metrics["eos_extrapolated"]:
            log.warning("A fitted V0 lies outside the sampled volumes; widen eos_max_volume_strain.")
        curves["eos"] = {
            name: {"volumes": r.volumes.tolist(), "energies": r.energies.tolist()}
            for name, r in (("teacher", eos_teacher), ("student", eos_student))
        }
        plot_equation_of_state(eos_student, eos_teacher, output / "eos.png")
        if eos_teacher.v0_in_range:
            geometry = _bare(relaxed)
            geometry.set_cell(relaxed.cell.array * (eos_teacher.v0 / relaxed.get_volume()) ** (1 / 3), scale_atoms=True)
            geometry, residual = relax_positions(teacher_calc, geometry, relax_fmax, relax_steps)
            metrics["reference_max_force_eV_A"] = residual
        metrics["seconds_eos"] = time.perf_counter() - started

    if "frequencies" in chosen:
        started = time.perf_counter()
        metrics["reference_student_max_force_eV_A"] = _max_force(student_calc, geometry)
        teacher_modes = vibrational_frequencies(teacher_calc, geometry, frequency_delta)
        student_modes = vibrational_frequencies(student_calc, geometry, frequency_delta)
        metrics.update(compare_frequencies(student_modes, teacher_modes))
        curves["frequencies_cm1"] = {
            "teacher": teacher_modes.frequencies_cm1.tolist(),
            "student": student_modes.frequencies_cm1.tolist(),
        }
        plot_frequencies(student_modes, teacher_modes, output / "frequencies.png")
        metrics["seconds_frequencies"] = time.perf_counter() - started

    if "rdf" in chosen:
        started = time.perf_counter()
        start = _bare(md_atoms) if md_atoms is not None else repeat_to(relaxed, md_min_atoms)
        md = {
            "steps": md_steps,
            "timestep_fs": md_timestep_fs,
            "temperature_K": md_temperature_K,
            "friction_per_fs": md_friction_per_fs,
            "equilibration_steps": md_equilibration_steps,
            "interval": md_interval,
            "seed": seed,
        }
        frames = {
            name: langevin_frames(calc, start, **md)
            for name, calc in (("teacher", teacher_calc), ("student", student_calc))
        }
        metrics.update({f"rdf_frames_{name}": float(len(f)) for name, f in frames.items()})
        metrics["md_num_atoms"] = float(len(start))
        if not frames["teacher"]:
            raise RuntimeError("The teacher's MD run gave no finite frame; no reference RDF.")
        rdf_teacher = radial_distribution(frames["teacher"], rdf_rmax, rdf_bin_width)
        metrics["rdf_rmax_A"] = float(rdf_teacher.r[-1] + 0.5 * (rdf_teacher.r[1] - rdf_teacher.r[0]))
        metrics["rdf_peak_teacher_A"] = rdf_teacher.peak_position()
        for pair in rdf_teacher.g:
            if pair != "total":
                metrics[f"rdf_peak_{pair}_teacher_A"] = rdf_teacher.peak_position(pair)
        if frames["student"]:
            rdf_student = radial_distribution(frames["student"], rdf_rmax, rdf_bin_width)
            metrics["rdf_difference"] = rdf_difference(rdf_student.g["total"], rdf_teacher.g["total"])
            metrics["rdf_peak_student_A"] = rdf_student.peak_position()
            for pair in rdf_teacher.g:
                if pair != "total":
                    metrics[f"rdf_difference_{pair}"] = rdf_difference(rdf_student.g[pair], rdf_teacher.g[pair])
                    metrics[f"rdf_peak_{pair}_student_A"] = rdf_student.peak_position(pair)
            curves["rdf"] = {
                "r": rdf_teacher.r.tolist(),
                "teacher": _lists(rdf_teacher.g),
                "student": _lists(rdf_student.g),
            }
            plot_rdf(rdf_student, rdf_teacher, output / "rdf.png")
        else:
            log.error("The student's MD run gave no finite frame: its RDF difference is NaN.")
            metrics["rdf_difference"] = math.nan
        metrics["seconds_rdf"] = time.perf_counter() - started

    metrics = {f"{PREFIX}{name}": float(value) for name, value in metrics.items()}
    (output / "observables.json").write_text(json.dumps({"metrics": metrics, "curves": curves}, indent=1) + "\n")
    return metrics


def _lists(curves: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {name: values.tolist() for name, values in curves.items()}
