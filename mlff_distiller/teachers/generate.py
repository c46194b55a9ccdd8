"""The built-in dataset: periodic Cu-Au fcc alloy cells, generated once and labelled by a teacher.

:func:`generate_alloy_structures` mixes rattled + strained cells with snapshots of short Langevin MD runs
(driven by EMT) at several temperatures; everything is seeded and deterministic. :func:`build_default_dataset`
labels them with a teacher and caches the result under a hash of its configuration.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import announce, build_once, cache_files, canonical, commit_dataset, default_cache_dir, file_tag
from .structures import LATTICE_CONSTANTS, fresh_copy, langevin_snapshots, random_alloy

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bump when the recipe changes so cached datasets are rebuilt."""
LABELS = ["energy", "forces", "stress"]  # part of the cache key: a set labelled with fewer is rebuilt

__all__ = [
    "GENERATOR_VERSION",
    "LATTICE_CONSTANTS",
    "build_default_dataset",
    "default_cache_dir",
    "generate_alloy_structures",
]


def _alloy_cell(
    rng: np.random.Generator,
    elements: tuple[str, str],
    fraction_range: tuple[float, float],
    repeat: tuple[int, int, int],
    strain_max: float,
) -> Atoms:
    """A cubic fcc supercell with a random fraction of ``elements[1]``, Vegard lattice constant, random strain."""
    from ase.build import bulk

    host, solute = elements
    lattice = bulk(host, "fcc", a=1.0, cubic=True).repeat(repeat)
    constants = (LATTICE_CONSTANTS[host], LATTICE_CONSTANTS[solute])
    return random_alloy(lattice, solute, fraction_range, constants, rng, strain_max)


def generate_alloy_structures(
    num_structures: int,
    seed: int = 0,
    elements: Sequence[str] = ("Cu", "Au"),
    fraction_range: Sequence[float] = (0.0, 0.5),
    supercell: Sequence[int] = (2, 2, 2),
    rattle_std: float = 0.1,
    strain_max: float = 0.03,
    md_fraction: float = 0.5,
    temperatures: Sequence[float] = (300, 600, 900, 1200),
    snapshots_per_run: int = 10,
    timestep_fs: float = 4.0,
    friction_per_fs: float = 0.02,
    equilibration_steps: int = 50,
    snapshot_interval: int = 15,
    shuffle: bool = True,
    workers: int = 1,
) -> list[Atoms]:
    """``num_structures`` periodic fcc alloy cells (32 atoms for the default 2x2x2 cubic supercell).

    Each cell draws the fraction of ``elements[1]`` uniformly from ``fraction_range``, places it on random
    sites, takes its lattice constant from Vegard's law and applies a random symmetric strain (components up
    to ``strain_max``). A fraction ``1 - md_fraction`` of them are then rattled (Gaussian, ``rattle_std`` Å
    per component; ``info['config_type'] = 'rattle'``); the rest are snapshots of Langevin MD runs with EMT
    (``timestep_fs``, one snapshot every ``snapshot_interval`` steps after ``equilibration_steps``), the runs
    cycling through ``temperatures`` (``config_type`` e.g. ``'md_600K'``, plus ``md_run`` and ``md_snapshot``).
    ``info`` also holds ``fraction_<element>`` and ``generator_index`` (position before shuffling).
    Seeded and deterministic; with ``shuffle`` the list is permuted (seeded) so that contiguous splits mix
    the kinds of structures. ``workers > 1`` runs the MD in that many spawned processes, one thread each:
    every run has its own random stream, so the structures are the same as with one (call it under
    ``if __name__ == "__main__":`` in a script).
    """
    if num_structures < 0:
        raise ValueError(f"num_structures must be non-negative, got {num_structures}.")
    if not 0.0 <= md_fraction <= 1.0:
        raise ValueError(f"md_fraction must be in [0, 1], got {md_fraction}.")
    if len(elements) != 2 or any(e not in LATTICE_CONSTANTS for e in elements):
        raise ValueError(f"elements must be two of {sorted(LATTICE_CONSTANTS)}, got {list(elements)}.")
    elements = (str(elements[0]), str(elements[1]))
    fraction_range = (float(fraction_range[0]), float(fraction_range[1]))
    supercell = (int(supercell[0]), int(supercell[1]), int(supercell[2]))
    temperatures = [float(t) for t in temperatures]
    if md_fraction > 0 and not temperatures:
        raise ValueError("md_fraction > 0 needs at least one temperature.")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")

    n_md = int(round(md_fraction * num_structures))
    n_rattle = num_structures - n_md
    n_runs = -(-n_md // snapshots_per_run) if n_md else 0
    streams = np.random.SeedSequence([GENERATOR_VERSION, seed]).spawn(n_rattle + n_runs + 1)

    structures: list[Atoms] = []
    solute_key = f"fraction_{elements[1]}"
    for k in range(n_rattle):
        rng = np.random.default_rng(streams[k])
        atoms = _alloy_cell(rng, elements, fraction_range, supercell, strain_max)
        atoms.positions += rng.normal(0.0, rattle_std, size=atoms.positions.shape)
        fraction = float(np.mean(atoms.symbols == elements[1]))
        structures.append(fresh_copy(atoms, config_type="rattle", **{solute_key: fraction}))

    runs, remaining = [], n_md
    for run in range(n_runs):
        count = min(snapshots_per_run, remaining)
        remaining -= count
        temperature = temperatures[run % len(temperatures)]
        md = (temperature, count, timestep_fs, friction_per_fs, equilibration_steps, snapshot_interval)
        runs.append((streams[n_rattle + run], elements, fraction_range, supercell, strain_max, md))
    for run, snapshots in enumerate(_map_runs(_md_run, runs, workers)):  # every run has >= 1 snapshot
        temperature = temperatures[run % len(temperatures)]
        fraction = float(np.mean(snapshots[0].symbols == elements[1]))
        for i, snapshot in enumerate(snapshots):
            info = {"config_type": f"md_{temperature:g}K", "md_run": run, "md_snapshot": i, solute_key: fraction}
            structures.append(fresh_copy(snapshot, **info))

    for index, atoms in enumerate(structures):
        atoms.info["generator_index"] = index
    if shuffle:
        order = np.random.default_rng(streams[-1]).permutation(len(structures))
        structures = [structures[i] for i in order]
    return structures


def _md_run(task: tuple) -> list[Atoms]:
    """The snapshots of one MD run of :func:`generate_alloy_structures` (a pool task: plain arguments)."""
    stream, elements, fraction_range, supercell, strain_max, md = task
    rng = np.random.default_rng(stream)
    atoms = _alloy_cell(rng, elements, fraction_range, supercell, strain_max)
    return langevin_snapshots(atoms, rng, *md)


def _map_runs(function: Any, tasks: list, workers: int) -> list:
    """``[function(t) for t in tasks]``, in ``workers`` spawned one-thread processes when that is > 1."""
    if workers == 1 or len(tasks) < 2:
        return [function(task) for task in tasks]
    import multiprocessing

    from .labelling import single_threaded_children

    with single_threaded_children(), multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        return pool.map(function, tasks, chunksize=1)


def _dataset_config(num_structures: int, seed: int, teacher: str, teacher_kwargs: dict, generator_kwargs: dict) -> dict:
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(generate_alloy_structures).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in ("seed", "workers")
    }
    unknown = set(generator_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"Unknown generator options {sorted(unknown)}; accepted: {sorted(defaults)}.")
    generator = {**defaults, **generator_kwargs}
    config = {
        "dataset": "fcc_alloy",
        "generator_version": GENERATOR_VERSION,
        "labels": LABELS,
        "num_structures": int(num_structures),
        "seed": int(seed),
        "teacher": str(teacher),
        "teacher_kwargs": dict(teacher_kwargs),
        "generator": generator,
    }
    # JSON round trip: tuples become lists, so the hash depends on values, not on container types.
    return canonical(config)


def build_default_dataset(
    cache_dir: str | os.PathLike[str] | None = None,
    num_structures: int = 1100,
    seed: int = 0,
    teacher: str = "emt",
    teacher_kwargs: dict[str, Any] | None = None,
    chunk_size: int = 50,
    progress: bool = True,
    site_energies: bool = False,
    label_workers: int = 1,
    workers: int = 1,
    **generator_kwargs: Any,
) -> Path:
    """Generate the Cu-Au alloy set, label it with ``teacher`` once, and return the cached extended-XYZ file.

    The file is ``<cache_dir>/<elements>_<teacher>_<hash12>.extxyz`` (default ``cache_dir``:
    :func:`default_cache_dir`), where the hash covers every setting (including the generator's defaults and
    version); a JSON sidecar with the same stem holds that configuration. A complete file is returned
    without calling the teacher. Labelling goes to ``<stem>.partial.extxyz`` and resumes from it after an
    interruption; only a complete set is renamed (atomically) to the final name, and a file lock keeps
    concurrent builders of the same set from interleaving. ``site_energies`` also labels the teacher's
    per-atom energies (part of the cache key); ``workers`` runs the generator's MD and ``label_workers`` the
    labelling in that many processes (the same file; neither is part of the key). The sidecar records the
    teacher's cost (``teacher_cost``: calls and CPU seconds, in total and per structure; see
    :func:`~.labelling.labelling_cost`).
    """
    from .calculators import CalculatorSpec, check_site_energies, make_calculator
    from .labelling import cost_path, label_structures, labelling_cost

    if workers < 1:  # before anything is built or locked
        raise ValueError(f"workers must be >= 1, got {workers}.")
    teacher_kwargs = dict(teacher_kwargs or {})
    if site_energies:
        check_site_energies(CalculatorSpec(teacher, teacher_kwargs))  # before generating anything
    config = _dataset_config(num_structures, seed, teacher, teacher_kwargs, generator_kwargs)
    if site_energies:
        config["labels"] = [*LABELS, "site_energies"]
    elements = "".join(e.lower() for e in config["generator"]["elements"])
    path, sidecar = cache_files(cache_dir, f"{elements}_{file_tag(teacher)}", config)
    directory, stem = path.parent, path.stem
    with build_once(path, sidecar, config, progress) as build:
        if not build:
            return path
        started = time.perf_counter()
        announce(f"Building dataset ({num_structures} structures, teacher {teacher!r}) -> {path}", progress)
        structures = generate_alloy_structures(num_structures, seed, **config["generator"], workers=workers)
        generated = time.perf_counter()
        partial = directory / f"{stem}.partial.extxyz"
        calculator = (
            CalculatorSpec(teacher, teacher_kwargs) if label_workers > 1 else make_calculator(teacher, **teacher_kwargs)
        )
        label_structures(
            structures,
            calculator,
            partial,
            chunk_size=chunk_size,
            progress=progress,
            site_energies=site_energies,
            workers=label_workers,
        )
        labelled = time.perf_counter()
        commit_dataset(
            partial,
            path,
            sidecar,
            config=config,
            seconds_generate=round(generated - started, 2),
            seconds_label=round(labelled - generated, 2),
            teacher_cost=labelling_cost(partial, per_structure=True),
            label_workers=label_workers,
        )
        cost_path(partial).unlink(missing_ok=True)  # now in the sidecar
        timing = f"generated in {generated - started:.1f} s, labelled in {labelled - generated:.1f} s"
        announce(f"Dataset ready: {path} ({timing})", progress)
    return path
