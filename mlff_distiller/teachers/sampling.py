"""Structures of one chemical system for distillation: seeds, rattle + strain, MD, deduplication, labelling.

A system is given by a file of seed structures (anything ASE reads) or a built-in generator by name
(:func:`seed_structures`): a bulk crystal (``"Cu"``, ``"Si"``, ``"Fe"``: ASE's reference structure),
a random substitutional alloy (``"CuAu"``, ``"NiPt"``: the first element's lattice, Vegard lattice
constant), a molecule (``"H2O"``, ``"CH3CH2OH"``: ``ase.build.molecule``) or a box of liquid water
(``"water"``: :func:`~mlff_distiller.teachers.systems.water_box`).

:func:`sample_structures` keeps the seeds, adds rattled + strained copies and snapshots of Langevin MD at
a list of temperatures driven by any calculator (the teacher, a cheap stand-in such as EMT, or a
student), and drops duplicates (:func:`deduplicate`). Every structure records how it was made in
``atoms.info``: ``provenance`` (e.g. ``"md:T=600K:seed=1:run=3:step=40"``), ``config_type`` (``seed``,
``rattle``, ``md_600K``) and, for MD, ``md_run`` (the split's group key), ``md_snapshot`` and
``temperature_K``. :func:`build_distillation_dataset` labels them with a teacher (optionally with Hessian
rows) into a cached, resumable file, as :func:`~mlff_distiller.teachers.generate.build_default_dataset`
does for the built-in set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .generate import (
    LATTICE_CONSTANTS,
    _announce,
    _build_once,
    _cache_files,
    _commit_dataset,
    _fresh,
    _jsonable,
    _md_snapshots,
    _random_strain,
    _sha256,
    _tag,
)
from .hessian import DEFAULT_DELTA

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

SAMPLER_VERSION = 1
"""Bump when the sampling recipe changes so cached distillation sets are rebuilt."""

KINDS = ("auto", "bulk", "alloy", "molecule")


# ---------------------------------------------------------------------- seeds
def _elements(name: str) -> list[str] | None:
    """The element symbols of a formula without counts (``"CuAu"`` -> ``["Cu", "Au"]``), else None."""
    from ase.data import atomic_numbers

    symbols = re.findall(r"[A-Z][a-z]?", name)
    if "".join(symbols) != name or any(s not in atomic_numbers for s in symbols):
        return None
    return symbols


def _is_molecule(name: str) -> bool:
    from ase.build import molecule

    try:
        molecule(name)
    except KeyError:
        return False
    return True


def _supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    """Repeat ``atoms`` along its shortest (repeated) lattice vector until it has at least ``min_atoms``."""
    repeat = np.ones(3, dtype=int)
    lengths = atoms.cell.lengths()
    while len(atoms) * repeat.prod() < min_atoms:
        repeat[int(np.argmin(lengths * repeat))] += 1
    return atoms.repeat(tuple(repeat))


def _lattice_constant(symbol: str, structure: str) -> float:
    from ase.data import atomic_numbers, reference_states

    if structure == "fcc" and symbol in LATTICE_CONSTANTS:
        return LATTICE_CONSTANTS[symbol]
    state = reference_states[atomic_numbers[symbol]] or {}
    if state.get("symmetry") != structure or "a" not in state:
        raise ValueError(
            f"No {structure} lattice constant is known for {symbol} (its reference structure is "
            f"{state.get('symmetry')!r}); an alloy needs elements whose reference structures match."
        )
    return float(state["a"])


def seed_structures(
    system: str | None = None,
    path: str | os.PathLike[str] | None = None,
    kind: str = "auto",
    min_atoms: int = 32,
    num_seeds: int = 4,
    fraction_range: Sequence[float] = (0.2, 0.8),
    crystalstructure: str | None = None,
    lattice_constant: float | None = None,
    vacuum: float = 6.0,
    seed: int = 0,
) -> list[Atoms]:
    """Seed structures of a system: every structure of the ASE-readable file ``path``, or built by name.

    ``kind`` (``auto``, ``bulk``, ``alloy``, ``molecule``) says how ``system`` is read; ``auto`` takes a
    single element symbol as a bulk crystal, a name ``ase.build.molecule`` knows as a molecule and any
    other formula of element symbols without counts as an alloy. Crystals are repeated to at least
    ``min_atoms`` atoms (``crystalstructure`` / ``lattice_constant`` override ASE's reference state, e.g.
    ``"NaCl"`` with ``kind="bulk", crystalstructure="rocksalt", lattice_constant=5.64``). An alloy gives
    ``num_seeds`` cells whose fraction of the second element is uniform in ``fraction_range`` (seeded by
    ``seed``). A molecule is centred in a non-periodic box with ``vacuum`` Å on each side. ``"water"`` gives
    ``num_seeds`` periodic boxes of liquid water of ``ceil(min_atoms / 3)`` molecules at 1 g/cm³
    (:func:`~mlff_distiller.teachers.systems.water_seeds`).
    """
    from ase.build import bulk, molecule

    if (system is None) == (path is None):
        raise ValueError(f"Give exactly one of system (a name) or path (a file); got system={system!r}, path={path!r}.")
    if path is not None:
        import ase.io

        structures = ase.io.read(path, index=":")
        structures = structures if isinstance(structures, list) else [structures]
        if not structures:
            raise ValueError(f"The seed file {str(path)!r} holds no structures.")
        return [
            _fresh(atoms, provenance=f"seed:file={Path(path).name}:index={i}") for i, atoms in enumerate(structures)
        ]
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid; accepted: {', '.join(KINDS)}.")
    if system == "water" and kind == "auto":  # the built-in liquid; "H2O" stays the single molecule
        from .systems import water_seeds

        return water_seeds(min_atoms, num_seeds, seed)
    elements = _elements(system)
    if kind == "auto":
        if elements is not None and len(elements) == 1:
            kind = "bulk"
        elif _is_molecule(system):
            kind = "molecule"
        elif elements is not None and len(set(elements)) >= 2:
            kind = "alloy"
        else:
            raise ValueError(
                f"system={system!r} is neither an element (bulk crystal), a molecule ase.build.molecule "
                "knows, nor a formula of element symbols (alloy, e.g. 'CuAu'); give a seed file as path instead."
            )
    if kind == "molecule":
        atoms = molecule(system)
        atoms.center(vacuum=vacuum)
        atoms.pbc = False
        return [_fresh(atoms, provenance=f"seed:molecule={system}")]
    if kind == "bulk":
        options = {"crystalstructure": crystalstructure, "a": lattice_constant}
        options = {k: v for k, v in options.items() if v is not None}
        try:
            cell = bulk(system, cubic=True, **options)
        except (ValueError, RuntimeError):  # hcp and friends have no cubic cell
            cell = bulk(system, orthorhombic=True, **options)
        return [_fresh(_supercell(cell, min_atoms), provenance=f"seed:bulk={system}")]
    if elements is None or len(elements) != 2 or elements[0] == elements[1]:
        raise ValueError(f"An alloy system names two elements, e.g. 'CuAu'; got {system!r}.")
    from ase.data import atomic_numbers, reference_states

    host, solute = elements
    structure = crystalstructure or (reference_states[atomic_numbers[host]] or {}).get("symmetry")
    if structure not in ("fcc", "bcc"):
        raise ValueError(f"Alloys are built on fcc or bcc lattices; {host}'s reference structure is {structure!r}.")
    a_host, a_solute = _lattice_constant(host, structure), _lattice_constant(solute, structure)
    rng = np.random.default_rng([SAMPLER_VERSION, seed])
    seeds = []
    for k in range(num_seeds):
        atoms = _supercell(bulk(host, structure, a=1.0, cubic=True), min_atoms)
        count = int(round(rng.uniform(*fraction_range) * len(atoms)))
        numbers = atoms.numbers.copy()
        numbers[rng.permutation(len(atoms))[:count]] = atomic_numbers[solute]
        atoms.numbers = numbers
        x = count / len(atoms)
        atoms.set_cell(atoms.cell.array * ((1 - x) * a_host + x * a_solute), scale_atoms=True)
        seeds.append(_fresh(atoms, provenance=f"seed:alloy={system}:{solute}={x:.3f}:index={k}"))
    return seeds


# ---------------------------------------------------------------------- sampling
def rattle_and_strain(
    seeds: Sequence[Atoms], count: int, rattle_std: float = 0.05, strain_max: float = 0.02, seed: int = 0
) -> list[Atoms]:
    """``count`` copies of the seeds (cycling through them), each with a random symmetric strain (components up
    to ``strain_max``; periodic seeds only) and Gaussian displacements of ``rattle_std`` Å per component."""
    streams = np.random.SeedSequence([SAMPLER_VERSION, seed, 1]).spawn(count)
    out = []
    for i, stream in enumerate(streams):
        rng = np.random.default_rng(stream)
        index = i % len(seeds)
        atoms = seeds[index].copy()
        if atoms.pbc.all() and strain_max > 0:
            atoms.set_cell(atoms.cell.array @ _random_strain(rng, strain_max), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle_std, size=atoms.positions.shape)
        provenance = f"rattle:seed={index}:i={i}:std={rattle_std:g}:strain={strain_max:g}"
        out.append(_fresh(atoms, provenance=provenance, config_type="rattle", seed_index=index))
    return out


def default_timestep_fs(atoms: Atoms) -> float:
    """MD timestep when none is given: 0.5 fs with hydrogen (fast vibrations), else 2 fs."""
    return 0.5 if 1 in atoms.numbers else 2.0


def md_samples(
    seeds: Sequence[Atoms],
    calculator: Any,
    temperatures: Sequence[float],
    runs_per_temperature: int = 1,
    snapshots_per_run: int = 10,
    timestep_fs: float | None = None,
    friction_per_fs: float = 0.02,
    equilibration_steps: int = 20,
    snapshot_interval: int = 10,
    seed: int = 0,
) -> list[Atoms]:
    """Snapshots of Langevin MD runs driven by ``calculator``: ``runs_per_temperature`` runs at each temperature
    (K), the runs cycling through the seeds. ``timestep_fs`` None: 0.5 fs with hydrogen, else 2 fs."""
    runs = [(float(t), r) for t in temperatures for r in range(runs_per_temperature)]
    streams = np.random.SeedSequence([SAMPLER_VERSION, seed, 2]).spawn(len(runs))
    out = []
    for run, ((temperature, _), stream) in enumerate(zip(runs, streams)):
        index = run % len(seeds)
        start = seeds[index]
        step = timestep_fs if timestep_fs is not None else default_timestep_fs(start)
        snapshots = _md_snapshots(
            start,
            np.random.default_rng(stream),
            temperature,
            snapshots_per_run,
            step,
            friction_per_fs,
            equilibration_steps,
            snapshot_interval,
            calculator=calculator,
        )
        for i, snapshot in enumerate(snapshots):
            md_step = equilibration_steps + (i + 1) * snapshot_interval
            info = {
                "provenance": f"md:T={temperature:g}K:seed={index}:run={run}:step={md_step}",
                "config_type": f"md_{temperature:g}K",
                "seed_index": index,
                "md_run": run,
                "md_snapshot": i,
                "temperature_K": temperature,
            }
            out.append(_fresh(snapshot, **info))
    return out


def fingerprint(atoms: Atoms) -> np.ndarray:
    """A vector that does not change under permutations of like atoms, rotations and translations: the
    sorted interatomic distances (minimum image when periodic) of each pair of elements, in a fixed
    order, followed by the cell lengths and angles (periodic only)."""
    numbers = atoms.numbers
    if len(atoms) > 1:
        distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        i, j = np.triu_indices(len(atoms), k=1)
        low, high = np.minimum(numbers[i], numbers[j]), np.maximum(numbers[i], numbers[j])
        order = np.lexsort((distances[i, j], high, low))  # by element pair, then distance
        parts = [distances[i, j][order]]
    else:
        parts = [np.zeros(0)]
    if atoms.pbc.any():
        parts.append(atoms.cell.cellpar())
    return np.concatenate(parts)


def deduplicate(structures: Sequence[Atoms], tolerance: float = 0.01) -> list[Atoms]:
    """Drop every structure whose :func:`fingerprint` is within ``tolerance`` (max abs difference, Å and
    degrees) of one kept before it with the same composition and periodicity; the first one stays.

    Catches exact and near copies whatever the atom order, orientation or position; rattled copies
    (displacements of ~0.05 Å) and MD snapshots differ by much more. Two different structures could
    share the distance spectrum (homometric sets), which is rare for these samples.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0.")
    kept: list[Atoms] = []
    groups: dict[tuple, list[np.ndarray]] = {}
    for atoms in structures:
        key = (tuple(np.sort(atoms.numbers)), tuple(atoms.pbc))
        vector = fingerprint(atoms)
        others = groups.setdefault(key, [])
        if others and np.abs(np.stack(others) - vector).max(axis=1).min() <= tolerance:
            continue
        others.append(vector)
        kept.append(atoms)
    return kept


def sample_structures(
    seeds: Sequence[Atoms],
    md_calculator: Any | None = None,
    num_rattle: int = 32,
    rattle_std: float = 0.05,
    strain_max: float = 0.02,
    temperatures: Sequence[float] = (300.0, 600.0),
    runs_per_temperature: int = 1,
    snapshots_per_run: int = 10,
    timestep_fs: float | None = None,
    friction_per_fs: float = 0.02,
    equilibration_steps: int = 20,
    snapshot_interval: int = 10,
    dedup_tolerance: float = 0.01,
    seed: int = 0,
) -> list[Atoms]:
    """The seeds, ``num_rattle`` rattled + strained copies and MD snapshots (needs ``md_calculator`` when
    ``temperatures`` is not empty), deduplicated; each with its provenance in ``atoms.info``."""
    if not seeds:
        raise ValueError("sample_structures needs at least one seed structure.")
    seeds = [_fresh(atoms, **{"config_type": "seed", "seed_index": i, **atoms.info}) for i, atoms in enumerate(seeds)]
    structures = list(seeds) + rattle_and_strain(seeds, num_rattle, rattle_std, strain_max, seed)
    if temperatures and snapshots_per_run > 0:
        if md_calculator is None:
            raise ValueError("MD sampling at temperatures needs md_calculator (the teacher, EMT, a student...).")
        structures += md_samples(
            seeds,
            md_calculator,
            temperatures,
            runs_per_temperature,
            snapshots_per_run,
            timestep_fs,
            friction_per_fs,
            equilibration_steps,
            snapshot_interval,
            seed,
        )
    unique = deduplicate(structures, dedup_tolerance)
    if len(unique) < len(structures):
        log.info("Dropped %d duplicate structures of %d.", len(structures) - len(unique), len(structures))
    return unique


# ---------------------------------------------------------------------- cached, labelled set
def make_driver(name: str, **kwargs: Any) -> Any:
    """The calculator that drives sampling MD: a teacher name (:func:`make_calculator`) or
    ``"student:<checkpoint path>"`` (a trained student, :class:`~mlff_distiller.StudentCalculator`)."""
    if name.startswith("student:"):
        from ..calculator import StudentCalculator

        return StudentCalculator.from_checkpoint(name.split(":", 1)[1], **kwargs)
    from .calculators import make_calculator

    return make_calculator(name, **kwargs)


def build_distillation_dataset(
    system: str | None = None,
    seeds_path: str | os.PathLike[str] | None = None,
    teacher: str = "emt",
    teacher_kwargs: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    system_options: dict[str, Any] | None = None,
    num_rattle: int = 32,
    rattle_std: float = 0.05,
    strain_max: float = 0.02,
    temperatures: Sequence[float] = (300.0, 600.0),
    runs_per_temperature: int = 1,
    snapshots_per_run: int = 10,
    timestep_fs: float | None = None,
    friction_per_fs: float = 0.02,
    equilibration_steps: int = 20,
    snapshot_interval: int = 10,
    md_driver: str | None = None,
    md_driver_kwargs: dict[str, Any] | None = None,
    dedup_tolerance: float = 0.01,
    hessian_rows: int = 0,
    hessian_delta: float = DEFAULT_DELTA,
    chunk_size: int = 20,
    progress: bool = True,
) -> Path:
    """Sample a system (:func:`seed_structures` + :func:`sample_structures`), label it with ``teacher`` (with
    ``hessian_rows`` Hessian rows per structure), and return the cached extended-XYZ file.

    ``md_driver`` None drives the MD with the teacher itself; a teacher name (e.g. ``"emt"``, cheap) or
    ``"student:<checkpoint>"`` drives it with that calculator, and the teacher only labels the snapshots.
    The file is ``<cache_dir>/distill_<system>_<teacher>_<hash12>.extxyz`` (default ``cache_dir``:
    :func:`~mlff_distiller.teachers.generate.default_cache_dir`); the hash covers every setting and the
    seed file's contents, and a JSON sidecar holds them with timings. Sampled structures are kept in
    ``<stem>.sampled.extxyz`` and labelling resumes from ``<stem>.partial.extxyz``, so an interrupted
    build repeats neither the (teacher-driven) MD nor finished labels; a file lock serialises builders.
    """
    import ase.io

    from .calculators import make_calculator
    from .labelling import label_structures

    seeds_file = Path(seeds_path) if seeds_path is not None else None
    config = json.loads(
        json.dumps(
            {
                "dataset": "distill",
                "sampler_version": SAMPLER_VERSION,
                "system": system,
                "seeds_sha256": _sha256(seeds_file) if seeds_file is not None else None,
                "system_options": dict(system_options or {}),
                "teacher": str(teacher),
                "teacher_kwargs": dict(teacher_kwargs or {}),
                "seed": int(seed),
                "sampling": {
                    "num_rattle": num_rattle,
                    "rattle_std": rattle_std,
                    "strain_max": strain_max,
                    "temperatures": [float(t) for t in temperatures],
                    "runs_per_temperature": runs_per_temperature,
                    "snapshots_per_run": snapshots_per_run,
                    "timestep_fs": timestep_fs,
                    "friction_per_fs": friction_per_fs,
                    "equilibration_steps": equilibration_steps,
                    "snapshot_interval": snapshot_interval,
                    "md_driver": md_driver,
                    "md_driver_kwargs": dict(md_driver_kwargs or {}),
                    "dedup_tolerance": dedup_tolerance,
                },
                "labels": ["energy", "forces", "stress"],
                "hessian": {"rows": int(hessian_rows), "delta": float(hessian_delta), "seed": int(seed)},
            },
            sort_keys=True,
            default=_jsonable,
        )
    )
    system_tag = _tag(system if seeds_file is None else seeds_file.stem)
    path, sidecar = _cache_files(cache_dir, f"distill_{system_tag}_{_tag(teacher)}", config)
    directory, stem = path.parent, path.stem
    with _build_once(path, sidecar, config, progress) as build:
        if not build:
            return path
        started = time.perf_counter()
        teacher_calculator = make_calculator(teacher, **(teacher_kwargs or {}))
        sampled_path = directory / f"{stem}.sampled.extxyz"
        if sampled_path.exists():
            structures = ase.io.read(sampled_path, index=":", format="extxyz")
            _announce(f"Resuming from {len(structures)} sampled structures in {sampled_path}", progress)
        else:
            _announce(f"Sampling {system or seeds_file} for distillation (teacher {teacher!r}) -> {path}", progress)
            seeds = seed_structures(system, seeds_file, seed=seed, **(system_options or {}))
            driver = teacher_calculator if md_driver is None else make_driver(md_driver, **(md_driver_kwargs or {}))
            sampling = {k: v for k, v in config["sampling"].items() if k not in ("md_driver", "md_driver_kwargs")}
            structures = sample_structures(seeds, driver, seed=seed, **sampling)
            temporary = directory / f"{stem}.sampled.extxyz.tmp"
            ase.io.write(temporary, structures, format="extxyz")
            os.replace(temporary, sampled_path)
            # Label what the file holds (8 decimals), so an interrupted build labels the very same structures.
            structures = ase.io.read(sampled_path, index=":", format="extxyz")
        sampled = time.perf_counter()
        partial = directory / f"{stem}.partial.extxyz"
        label_structures(
            structures,
            teacher_calculator,
            partial,
            chunk_size=chunk_size,
            progress=progress,
            hessian_rows=hessian_rows,
            hessian_delta=hessian_delta,
            hessian_seed=seed,
        )
        labelled = time.perf_counter()
        _commit_dataset(
            partial,
            path,
            sidecar,
            config=config,
            num_structures=len(structures),
            seconds_sample=round(sampled - started, 2),
            seconds_label=round(labelled - sampled, 2),
        )
        sampled_path.unlink(missing_ok=True)
        _announce(
            f"Distillation set ready: {path} ({len(structures)} structures; sampled in {sampled - started:.1f} s, "
            f"labelled in {labelled - sampled:.1f} s)",
            progress,
        )
    return path
