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
``rattle``, ``md_600K``, ``contact``) and, for MD, ``md_run`` (the split's group key), ``md_snapshot`` and
``temperature_K``. :func:`build_distillation_dataset` labels them with a teacher (optionally with Hessian
rows) into a cached, resumable file, as :func:`~mlff_distiller.teachers.generate.build_default_dataset`
does for the built-in set; :class:`SamplingConfig` is its typed, validated recipe.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..training.config import check_known_fields
from .cache import announce, build_once, cache_files, canonical, commit_dataset, file_tag, sha256_file
from .hessian import DEFAULT_DELTA
from .structures import (
    default_timestep_fs,
    fresh_copy,
    langevin_snapshots,
    random_alloy,
    random_strain,
    supercell,
)
from .structures import (
    lattice_constant as reference_lattice_constant,
)

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
            fresh_copy(atoms, provenance=f"seed:file={Path(path).name}:index={i}") for i, atoms in enumerate(structures)
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
        return [fresh_copy(atoms, provenance=f"seed:molecule={system}")]
    if kind == "bulk":
        options = {"crystalstructure": crystalstructure, "a": lattice_constant}
        options = {k: v for k, v in options.items() if v is not None}
        try:
            cell = bulk(system, cubic=True, **options)
        except (ValueError, RuntimeError):  # hcp and friends have no cubic cell
            cell = bulk(system, orthorhombic=True, **options)
        return [fresh_copy(supercell(cell, min_atoms), provenance=f"seed:bulk={system}")]
    if elements is None or len(elements) != 2 or elements[0] == elements[1]:
        raise ValueError(f"An alloy system names two elements, e.g. 'CuAu'; got {system!r}.")
    from ase.data import atomic_numbers, reference_states

    host, solute = elements
    structure = crystalstructure or (reference_states[atomic_numbers[host]] or {}).get("symmetry")
    if structure not in ("fcc", "bcc"):
        raise ValueError(f"Alloys are built on fcc or bcc lattices; {host}'s reference structure is {structure!r}.")
    constants = (reference_lattice_constant(host, structure), reference_lattice_constant(solute, structure))
    rng = np.random.default_rng([SAMPLER_VERSION, seed])
    lattice = supercell(bulk(host, structure, a=1.0, cubic=True), min_atoms)
    seeds = []
    for k in range(num_seeds):
        atoms = random_alloy(lattice, solute, fraction_range, constants, rng)
        x = float(np.mean(atoms.numbers == atomic_numbers[solute]))
        seeds.append(fresh_copy(atoms, provenance=f"seed:alloy={system}:{solute}={x:.3f}:index={k}"))
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
            atoms.set_cell(atoms.cell.array @ random_strain(rng, strain_max), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle_std, size=atoms.positions.shape)
        provenance = f"rattle:seed={index}:i={i}:std={rattle_std:g}:strain={strain_max:g}"
        out.append(fresh_copy(atoms, provenance=provenance, config_type="rattle", seed_index=index))
    return out


def volume_copies(seeds: Sequence[Atoms], volume_changes: Sequence[float]) -> list[Atoms]:
    """Each periodic seed scaled isotropically (fractional coordinates fixed) to ``1 + dv`` times its volume for
    every ``dv`` of ``volume_changes``: the equation of state's points, which random strains of a few per cent
    rarely reach together (a bulk modulus is the curvature over such a range). Non-periodic seeds give none."""
    out = []
    for index, seed in enumerate(seeds):
        if not seed.pbc.all():
            continue
        for change in volume_changes:
            atoms = seed.copy()
            atoms.set_cell(seed.cell.array * (1.0 + change) ** (1.0 / 3.0), scale_atoms=True)
            provenance = f"volume:seed={index}:dv={change:+g}"
            out.append(fresh_copy(atoms, provenance=provenance, config_type="volume", seed_index=index))
    return out


FRAGMENT_BOND_FACTOR = 1.3
"""Two atoms closer than this x the sum of their covalent radii are bonded (:func:`contact_copies` moves bonded
fragments whole): 1.26 Å for O-H, beyond a thermal O-H bond (rattled by 0.05 Å, 1.17 Å) and short of a hydrogen
bond (1.8 Å)."""

CONTACT_DRAWS = 100
"""Draws of a contact copy before giving up, when every pushed pair brought other atoms too close."""


def bonded_fragments(atoms: Atoms) -> np.ndarray:
    """The bonded fragment of each atom, as a label (connected components of bonds, :data:`FRAGMENT_BOND_FACTOR`)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=FRAGMENT_BOND_FACTOR))
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(atoms), len(atoms)))
    return connected_components(graph, directed=False)[1]


def push_pair(
    atoms: Atoms,
    i: int,
    j: int,
    distance: float,
    fragments: np.ndarray | None = None,
    vector: np.ndarray | None = None,
) -> Atoms:
    """A copy of ``atoms`` with atoms ``i`` and ``j`` at ``distance`` (Å, minimum image), each moved by half the
    change along the line joining them, with its bonded fragment (``fragments``: :func:`bonded_fragments`)
    unless the two share one or it holds more than half the atoms (then the atom alone moves). ``vector``: the
    minimum-image vector from i to j, when already computed."""
    label = bonded_fragments(atoms) if fragments is None else fragments
    if vector is None:
        vector = atoms.get_distance(i, j, mic=bool(atoms.pbc.any()), vector=True)
    before = float(np.linalg.norm(np.asarray(vector)[None], axis=1)[0])  # as a row: the rounding of contact_copies'
    shift = vector / before * (before - distance) / 2
    out = atoms.copy()
    for atom, other, sign in ((i, j, 1.0), (j, i, -1.0)):
        moving = np.flatnonzero(label == label[atom])
        if label[atom] == label[other] or len(moving) > len(atoms) // 2:
            moving = np.array([atom])
        out.positions[moving] += sign * shift
    return out


def contact_copies(
    bases: Sequence[Atoms],
    count: int,
    fraction_range: Sequence[float] = (0.7, 1.0),
    seed: int = 0,
    neighbours: int = 3,
) -> list[Atoms]:
    """``count`` copies of ``bases`` (drawn at random), each with one pair of atoms pushed together along the line
    that joins them: the teacher's short-range wall, which MD at the target temperatures rarely reaches and a
    student left without it can fall through in a long run (a CHGNet water student's O-O wall turned over at
    1.6 Å, where the teacher's pushes the oxygens apart at 40 eV/Å; ``benchmarks/contact_walls.py``).

    The pair: an element pair drawn uniformly among those present, a random atom of one of its elements and one
    of the ``neighbours`` nearest atoms of the other (minimum image), so that bonded and non-bonded contacts of
    every element pair come up. Its new distance is a fraction, drawn uniformly from ``fraction_range``, of that
    element pair's closest contact over all of ``bases`` (never more than the pair's own distance); the stability
    gate fails a run whose pair comes closer than 0.6 x that contact, so ``(0.7, 1.0)`` labels most of the range
    between what MD sampled and the gate's bound. Each atom moves by half the change with its bonded fragment
    (:data:`FRAGMENT_BOND_FACTOR`: a water molecule moves whole), unless the two share a fragment or it holds
    more than half the atoms (a bond, a metal: the atom alone moves). A draw that brings any other pair closer
    than ``fraction_range[0]`` x its contact is drawn again, element pair included, so the pairs kept favour
    those that can be pushed alone (the SevenNet water recipe's 32: 19 H-H, 9 O-O, 4 O-H).

    Each copy has ``config_type="contact"``, ``train_only=True`` (trained on only: its energies and forces are far
    outside what validation and test measure, and it must not set the gate's bounds) and ``derived_from``, the
    provenance of its base (a copy of a held-out structure is not trained on either:
    :mod:`mlff_distiller.data.module`)."""
    from ..data.keys import DERIVED_FROM, TRAIN_ONLY
    from ..md.stability import closest_contacts, pair_name

    if count <= 0:
        return []
    if not bases:
        raise ValueError("contact_copies needs at least one base structure.")
    low, high = (float(f) for f in fraction_range)
    contacts = closest_contacts(bases)
    fragments: dict[int, np.ndarray] = {}
    streams = np.random.SeedSequence([SAMPLER_VERSION, seed, 3]).spawn(count)
    out = []
    for stream in streams:
        rng = np.random.default_rng(stream)
        for _ in range(CONTACT_DRAWS):
            index = int(rng.integers(len(bases)))
            base = bases[index]
            numbers = base.numbers
            elements = np.unique(numbers)
            pairs = [(a, b) for a in elements for b in elements if a <= b and (a != b or np.sum(numbers == a) > 1)]
            if not pairs:
                raise ValueError(f"contact_copies: base structure {index} has a single atom; no pair to push together.")
            first, second = rng.permutation(pairs[int(rng.integers(len(pairs)))])  # each element pair as often
            i = int(rng.choice(np.flatnonzero(numbers == first)))
            vectors = base.get_distances(i, range(len(base)), mic=bool(base.pbc.any()), vector=True)
            distances = np.linalg.norm(vectors, axis=1)
            candidates = [j for j in np.argsort(distances, kind="stable") if j != i and numbers[j] == second]
            j = int(candidates[int(rng.integers(min(neighbours, len(candidates))))])
            name = pair_name((int(numbers[i]), int(numbers[j])))
            before = float(distances[j])
            after = min(before, float(rng.uniform(low, high)) * contacts.get(name, before))
            if index not in fragments:
                fragments[index] = bonded_fragments(base)
            atoms = push_pair(base, i, j, after, fragments[index], vectors[j])
            if _respects_contacts(atoms, contacts, low):
                break
        else:
            raise ValueError(
                f"contact_copies: {CONTACT_DRAWS} draws each brought some pair closer than {low:g} x its closest "
                "contact; raise the low end of data.source.contact_range."
            )
        provenance = f"contact:base={index}:pair={name}:i={i}:j={j}:from={before:.3f}:to={after:.3f}"
        info = {TRAIN_ONLY: True, DERIVED_FROM: base.info.get("provenance", f"base={index}")}
        out.append(fresh_copy(atoms, provenance=provenance, config_type="contact", **info))
    return out


def _respects_contacts(atoms: Atoms, contacts: Mapping[str, float], fraction: float) -> bool:
    """Whether each element pair's closest approach in ``atoms`` is at least ``fraction`` x its entry of
    ``contacts`` (which :func:`~mlff_distiller.md.stability.closest_contacts` measured the same way)."""
    from ..md.stability import closest_pairs, pair_name

    return all(
        distance >= fraction * contacts.get(pair_name(pair), 0.0) * (1 - 1e-9)
        for pair, (distance, _, _) in closest_pairs(atoms).items()
    )


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
        snapshots = langevin_snapshots(
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
            out.append(fresh_copy(snapshot, **info))
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


def sample_structures(seeds: Sequence[Atoms], md_calculator: Any | None, config: SamplingConfig) -> list[Atoms]:
    """The seeds, their ``config.volume_scan`` copies, ``config.num_rattle`` rattled + strained copies, MD
    snapshots (needs ``md_calculator`` when ``config.temperatures`` is not empty) and ``config.num_contacts``
    copies of the snapshots with a pair pushed together (:func:`contact_copies`), deduplicated; each with its
    provenance in ``atoms.info``."""
    if not seeds:
        raise ValueError("sample_structures needs at least one seed structure.")
    seeds = [fresh_copy(a, **{"config_type": "seed", "seed_index": i, **a.info}) for i, a in enumerate(seeds)]
    rattled = rattle_and_strain(seeds, config.num_rattle, config.rattle_std, config.strain_max, config.seed)
    structures = list(seeds) + volume_copies(seeds, config.volume_scan) + rattled
    snapshots: list[Atoms] = []
    if config.temperatures and config.snapshots_per_run > 0:
        if md_calculator is None:
            raise ValueError("MD sampling at temperatures needs md_calculator (the teacher, EMT, a student...).")
        snapshots = md_samples(
            seeds,
            md_calculator,
            config.temperatures,
            config.runs_per_temperature,
            config.snapshots_per_run,
            config.timestep_fs,
            config.friction_per_fs,
            config.equilibration_steps,
            config.snapshot_interval,
            config.seed,
        )
        structures += snapshots
    # Pushed from thermal frames, where MD goes (SamplingConfig asks for MD when num_contacts > 0).
    structures += contact_copies(snapshots, config.num_contacts, config.contact_range, config.seed)
    unique = deduplicate(structures, config.dedup_tolerance)
    if len(unique) < len(structures):
        log.info("Dropped %d duplicate structures of %d.", len(structures) - len(unique), len(structures))
    return unique


# ---------------------------------------------------------------------- the typed recipe
@dataclass
class SamplingConfig:
    """How a distillation set is made: the system, its sampling and its labelling by the teacher.

    This is ``data.source`` of ``conf/data/distill.yaml`` (Hydra builds it from the YAML and checks every
    field); calling it builds the labelled set, or finds it in the cache (:func:`build_distillation_dataset`),
    which is what :class:`~mlff_distiller.data.module.AtomsDataModule` does with its ``source``. Fields marked
    "(not in the cache key)" do not change the result.
    """

    system: str | None = None
    """A built-in system by name (:func:`seed_structures`: ``"Cu"``, ``"CuAu"``, ``"H2O"``, ``"water"``) ..."""
    seeds_path: str | None = None
    """... or an ASE-readable file of seed structures (then ``system`` is null)."""
    system_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :func:`seed_structures` (``min_atoms``, ``num_seeds``, ``kind``, ...)."""
    teacher: str = "emt"
    """The labelling teacher's name (:func:`~mlff_distiller.teachers.calculators.make_calculator`)."""
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the teacher's calculator."""
    seed: int = 0
    """Seeds every random draw (alloy seeds, rattles, strains, MD, Hessian rows)."""
    num_rattle: int = 32
    """Rattled + strained copies of the seeds."""
    rattle_std: float = 0.05
    """Å, Gaussian displacement per component of the rattled copies."""
    strain_max: float = 0.02
    """Largest component of the random symmetric strain of rattled copies (periodic seeds)."""
    num_contacts: int = 0
    """Copies of the MD snapshots with one pair of atoms pushed together (:func:`contact_copies`): the teacher's
    short-range wall, for students that otherwise let atoms meet in long MD. Trained on only (never validated,
    tested or used for the gate's bounds). Needs MD (``temperatures``, ``snapshots_per_run``)."""
    contact_range: list[float] = field(default_factory=lambda: [0.7, 1.0])
    """The pushed pair's new distance, as a fraction (drawn uniformly from this range) of its element pair's
    closest contact in the structures pushed from."""
    volume_scan: list[float] = field(default_factory=list)
    """Relative volume changes (e.g. ``[-0.06, -0.03, 0.03, 0.06]``): each periodic seed is also labelled scaled
    isotropically to each (:func:`volume_copies`), so the student sees the teacher's equation of state."""
    temperatures: list[float] = field(default_factory=lambda: [300.0, 600.0])
    """K; Langevin MD runs at each (empty: no MD)."""
    runs_per_temperature: int = 1
    """MD runs per temperature, cycling through the seeds."""
    snapshots_per_run: int = 10
    """Snapshots kept per MD run."""
    timestep_fs: float | None = None
    """fs; null: 0.5 fs with hydrogen, else 2 fs."""
    friction_per_fs: float = 0.02
    """Langevin friction, 1/fs."""
    equilibration_steps: int = 20
    """MD steps before the first snapshot."""
    snapshot_interval: int = 10
    """MD steps between snapshots."""
    md_driver: str | None = None
    """Calculator that drives the MD: null is the teacher; a teacher name (``"emt"``) or
    ``"student:<checkpoint>"`` is cheaper, and the teacher then only labels."""
    md_driver_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the MD driver."""
    dedup_tolerance: float = 0.01
    """Å / degrees; structures whose fingerprints are this close count as duplicates (:func:`deduplicate`)."""
    seed_volume: str = "teacher"
    """``teacher``: crystal seeds are first scaled to the teacher's equilibrium volume
    (:func:`~.structures.teacher_volume`, :data:`~.structures.EOS_POINTS` teacher calls per crystal seed), so the
    student learns the teacher at the teacher's density, not at the lattice constant the seeds were built with;
    ``given``: seeds as built or read. Liquids and molecules are always kept as given."""
    hessian_rows: int = 0
    """Rows of the teacher's energy Hessian per structure (by finite differences: 2 extra teacher calls each; by
    autograd: one backward pass each, counted as one call)."""
    hessian_delta: float = DEFAULT_DELTA
    """Å, finite-difference displacement of the Hessian rows."""
    hessian_method: str = "auto"
    """``fd``, ``autograd`` or ``auto`` (autograd where the teacher allows it: chgnet, sevenn; :mod:`.hessian`)."""
    site_energies: bool = False
    """Also label the teacher's per-atom energies (emt, chgnet, sevenn)."""
    label_workers: int = 1
    """Label in this many processes, one thread each; the file is the same as with 1 (not in the cache key)."""
    cache_dir: str | None = None
    """Where labelled sets are cached; null: :func:`~mlff_distiller.teachers.cache.default_cache_dir`
    (not in the cache key)."""
    chunk_size: int = 20
    """Structures labelled between two fsyncs of the partial file (not in the cache key)."""
    progress: bool = True
    """Progress bars and messages on stderr (not in the cache key)."""

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"SamplingConfig.{name}={value!r} (data.source.{name}) is invalid: {accepted}.")

        self.temperatures = [float(t) for t in self.temperatures]
        self.volume_scan = [float(v) for v in self.volume_scan]
        self.system_options = dict(self.system_options)
        self.teacher_kwargs = dict(self.teacher_kwargs)
        self.md_driver_kwargs = dict(self.md_driver_kwargs)
        accepted = set(inspect.signature(seed_structures).parameters) - {"system", "path", "seed"}
        unknown = sorted(set(self.system_options) - accepted)
        if unknown:
            raise ValueError(
                f"SamplingConfig.system_options has unknown keys {unknown} (data.source.system_options); "
                f"accepted: {', '.join(sorted(accepted))}."
            )
        counts = (
            "num_rattle",
            "num_contacts",
            "runs_per_temperature",
            "snapshots_per_run",
            "equilibration_steps",
            "hessian_rows",
        )
        for name in counts:
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise bad(name, "it must be an integer >= 0")
        if self.snapshot_interval < 1:
            raise bad("snapshot_interval", "it must be an integer >= 1")
        if self.chunk_size < 1:
            raise bad("chunk_size", "it must be an integer >= 1")
        if self.label_workers < 1:
            raise bad("label_workers", "it must be an integer >= 1")
        if self.hessian_method not in ("fd", "autograd", "auto"):
            raise bad("hessian_method", "accepted: 'fd', 'autograd', 'auto'")
        if self.seed_volume not in ("teacher", "given"):
            raise bad("seed_volume", "accepted: 'teacher', 'given'")
        for name in ("rattle_std", "dedup_tolerance", "friction_per_fs"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "it must be a finite number >= 0")
        if not 0 <= self.strain_max < 0.5:
            raise bad("strain_max", "it must be in [0, 0.5)")
        if self.hessian_delta <= 0:
            raise bad("hessian_delta", "it must be > 0 (Å)")
        if self.timestep_fs is not None and not 0 < self.timestep_fs <= 10:
            raise bad("timestep_fs", "it must be in (0, 10] fs, or null for the default")
        if any(not math.isfinite(t) or t <= 0 for t in self.temperatures):
            raise bad("temperatures", "every temperature must be a finite number > 0 (K)")
        if any(not -0.5 < v < 0.5 or v == 0 for v in self.volume_scan):
            raise bad("volume_scan", "every relative volume change must be non-zero and in (-0.5, 0.5)")
        self.contact_range = [float(f) for f in self.contact_range]
        if len(self.contact_range) != 2 or not 0 < self.contact_range[0] <= self.contact_range[1] <= 1:
            raise bad("contact_range", "it must be two fractions [low, high] with 0 < low <= high <= 1")
        if self.num_contacts and not (self.temperatures and self.snapshots_per_run):
            raise bad(
                "num_contacts", "contact copies are pushed from MD snapshots; give temperatures and snapshots_per_run"
            )

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> SamplingConfig:
        """Build from a mapping, naming unknown keys and the accepted ones."""
        check_known_fields(cls, options, "sampling option")
        return cls(**dict(options))

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def cache_config(self) -> dict[str, Any]:
        """Every setting that changes the labelled set, as canonical JSON (the cache key hashes it)."""
        seeds_file = Path(self.seeds_path) if self.seeds_path is not None else None
        sampling = {
            name: getattr(self, name)
            for name in (
                "num_rattle",
                "rattle_std",
                "strain_max",
                "temperatures",
                "runs_per_temperature",
                "snapshots_per_run",
                "timestep_fs",
                "friction_per_fs",
                "equilibration_steps",
                "snapshot_interval",
                "md_driver",
                "md_driver_kwargs",
                "dedup_tolerance",
            )
        }
        if self.crystal_seeds():  # sets whose seeds are kept as given (liquids, molecules) keep their cache key
            sampling["seed_volume"] = self.seed_volume
        if self.volume_scan:  # sets without one keep their cache key
            sampling["volume_scan"] = self.volume_scan
        if self.num_contacts:  # likewise
            sampling["contacts"] = {"count": self.num_contacts, "range": self.contact_range}
        return canonical(
            {
                "dataset": "distill",
                "sampler_version": SAMPLER_VERSION,
                "system": self.system,
                "seeds_sha256": sha256_file(seeds_file) if seeds_file is not None else None,
                "system_options": self.system_options,
                "teacher": str(self.teacher),
                "teacher_kwargs": self.teacher_kwargs,
                "seed": int(self.seed),
                "sampling": sampling,
                "labels": ["energy", "forces", "stress", *(["site_energies"] if self.site_energies else [])],
                "hessian": {
                    "rows": int(self.hessian_rows),
                    "delta": float(self.hessian_delta),
                    "seed": int(self.seed),
                    # Only autograd is recorded: sets labelled by finite differences keep their cache key.
                    **({"method": "autograd"} if self.autograd_rows() else {}),
                },
            }
        )

    def check_system(self) -> None:
        """Raise ``ValueError`` unless exactly one of ``system`` and ``seeds_path`` is given."""
        if (self.system is None) == (self.seeds_path is None):
            raise ValueError(
                f"SamplingConfig needs exactly one of system (a built-in system by name) or seeds_path (a file "
                f"of seed structures), got system={self.system!r}, seeds_path={self.seeds_path!r} "
                "(data.source.system / data.source.seeds_path)."
            )
        if self.seeds_path is not None and not Path(self.seeds_path).is_file():
            raise ValueError(f"SamplingConfig.seeds_path={self.seeds_path!r} (data.source.seeds_path) is not a file.")

    def seeds(self) -> list[Atoms]:
        """The seed structures (:func:`seed_structures` with ``system_options``)."""
        self.check_system()
        return seed_structures(self.system, self.seeds_path, seed=self.seed, **self.system_options)

    def crystal_seeds(self, seeds: Sequence[Atoms] | None = None) -> list[int]:
        """Indices of the seeds that :attr:`seed_volume` ``teacher`` scales (periodic crystals; none when
        ``given``); ``seeds``: :meth:`seeds` already built (else they are built here)."""
        from .structures import system_kind

        if self.seed_volume == "given":
            return []
        seeds = self.seeds() if seeds is None else seeds
        return [i for i, atoms in enumerate(seeds) if atoms.pbc.all() and system_kind(atoms) == "crystal"]

    def most_structures(self) -> int:
        """The most structures the sampling can produce (before deduplication): the seeds, their volume copies,
        the rattled copies, the MD snapshots and the contact copies."""
        seeds = self.seeds()
        periodic = sum(1 for atoms in seeds if atoms.pbc.all())
        md = len(self.temperatures) * self.runs_per_temperature * self.snapshots_per_run
        return len(seeds) + periodic * len(self.volume_scan) + self.num_rattle + md + self.num_contacts

    def seed_teacher_calls(self) -> int:
        """Teacher calls spent placing the crystal seeds at the teacher's volume (0 with ``seed_volume=given``)."""
        from .structures import EOS_POINTS

        return EOS_POINTS * len(self.crystal_seeds())

    def overhead_teacher_calls(self) -> int:
        """Teacher calls of round 0 that label none of its structures: its teacher-driven MD and placing the
        seeds at the teacher's volume."""
        return self.md_teacher_calls() + self.seed_teacher_calls()

    def largest_cost(self) -> tuple[int, int]:
        """Round 0 at its largest: (structures before deduplication, teacher calls: their labels plus the
        teacher-driven MD and the seeds' placement)."""
        most = self.most_structures()
        return most, most * self.teacher_calls_per_structure() + self.overhead_teacher_calls()

    def teacher_seeds(self, teacher: Any) -> list[Atoms]:
        """The seeds the sampling starts from: :meth:`seeds`, each crystal scaled to ``teacher``'s equilibrium
        volume (``seed_volume=teacher``). The volumes are cached beside the labelled sets (keyed by the seeds and
        the teacher), so the report's references and a resumed build get the same cells without new calls."""
        import json

        from .cache import write_text_atomic
        from .structures import teacher_volume

        seeds = self.seeds()
        crystals = self.crystal_seeds(seeds)
        if not crystals:
            return seeds
        key = canonical(
            {
                "system": self.system,
                "seeds_sha256": sha256_file(Path(self.seeds_path)) if self.seeds_path is not None else None,
                "system_options": self.system_options,
                "seed": int(self.seed),
                "teacher": str(self.teacher),
                "teacher_kwargs": self.teacher_kwargs,
            }
        )
        _, path = cache_files(self.cache_dir, f"seedvolumes_{self.name()}_{file_tag(self.teacher)}", key)
        volumes = json.loads(path.read_text())["volumes"] if path.exists() else None
        if volumes is None or len(volumes) != len(crystals):
            volumes = []
            for index in crystals:
                try:
                    volumes.append(teacher_volume(seeds[index], teacher)[0])
                except ValueError as error:
                    raise ValueError(f"Seed {index} of {self.system or self.seeds_path}: {error}") from None
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"key": key, "seeds": crystals, "volumes": volumes}, indent=2) + "\n")
        for index, volume in zip(crystals, volumes):
            atoms = seeds[index]
            before = atoms.get_volume()
            atoms.set_cell(atoms.cell.array * (volume / before) ** (1.0 / 3.0), scale_atoms=True)
            atoms.info["seed_volume_scale"] = volume / before
        scales = ", ".join(f"{seeds[i].info['seed_volume_scale']:.3f}" for i in crystals)
        log.info("Crystal seeds scaled to the teacher's equilibrium volume (volume x %s).", scales)
        return seeds

    def name(self) -> str:
        """A file-name tag of the system (the built-in name or the seed file's stem)."""
        return file_tag(self.system if self.seeds_path is None else Path(self.seeds_path).stem)

    def autograd_rows(self) -> bool:
        """Whether the Hessian rows will be computed by autograd (``auto`` and the method it picks share a set)."""
        from .calculators import CalculatorSpec

        teacher = CalculatorSpec(self.teacher, self.teacher_kwargs).teacher
        return (
            self.hessian_rows > 0 and self.hessian_method != "fd" and teacher is not None and teacher.autograd_hessian
        )

    def teacher_calls_per_structure(self) -> int:
        """Teacher calls that labelling one structure costs, as the labelling counts them
        (``atoms.info["teacher_calls"]``): energy + forces (+ stress) is one call; Hessian rows add two calls each
        by finite differences, one pass in all by autograd."""
        if self.hessian_rows == 0:
            return 1
        return 2 if self.autograd_rows() else 1 + 2 * int(self.hessian_rows)

    def md_teacher_calls(self) -> int:
        """Teacher calls of the sampling MD when the teacher drives it (``md_driver`` null): one per step plus one
        at the start of each run; 0 with another driver."""
        if self.md_driver is not None or not self.temperatures or self.snapshots_per_run == 0:
            return 0
        runs = len(self.temperatures) * self.runs_per_temperature
        return runs * (self.equilibration_steps + self.snapshots_per_run * self.snapshot_interval + 1)

    def __call__(self) -> Path:
        """Build the labelled set, or find it in the cache; returns its path."""
        return build_distillation_dataset(self)


def make_driver(name: str, **kwargs: Any) -> Any:
    """The calculator that drives sampling MD: a teacher name (:func:`make_calculator`) or
    ``"student:<checkpoint path>"`` (a trained student, :class:`~mlff_distiller.StudentCalculator`)."""
    if name.startswith("student:"):
        from ..calculator import StudentCalculator

        return StudentCalculator.from_checkpoint(name.split(":", 1)[1], **kwargs)
    from .calculators import make_calculator

    return make_calculator(name, **kwargs)


# ---------------------------------------------------------------------- cached, labelled set
def build_distillation_dataset(config: SamplingConfig) -> Path:
    """Sample a system (:func:`seed_structures` + :func:`sample_structures`), label it with the teacher (with
    ``hessian_rows`` Hessian rows per structure), and return the cached extended-XYZ file.

    ``config.md_driver`` None drives the MD with the teacher itself; a teacher name (e.g. ``"emt"``, cheap) or
    ``"student:<checkpoint>"`` drives it with that calculator, and the teacher only labels the snapshots.
    The file is ``<cache_dir>/distill_<system>_<teacher>_<hash12>.extxyz`` (default ``cache_dir``:
    :func:`~mlff_distiller.teachers.cache.default_cache_dir`); the hash covers every setting and the
    seed file's contents (:meth:`SamplingConfig.cache_config`), and a JSON sidecar holds them with timings.
    Sampled structures are kept in ``<stem>.sampled.extxyz`` and labelling resumes from
    ``<stem>.partial.extxyz``, so an interrupted build repeats neither the (teacher-driven) MD nor finished
    labels; a file lock serialises builders. Hessian rows are computed by ``hessian_method``; ``site_energies``
    also labels the teacher's per-atom energies; ``label_workers`` labels in that many processes. The sidecar
    records the teacher's cost (``teacher_cost``, see :func:`~.labelling.labelling_cost`).
    """
    import ase.io

    from .calculators import CalculatorSpec, check_site_energies, make_calculator
    from .hessian import check_hessian_method_for
    from .labelling import cost_path, label_structures, labelling_cost

    if not isinstance(config, SamplingConfig):
        raise TypeError(f"build_distillation_dataset takes a SamplingConfig, got {type(config).__name__}.")
    config.check_system()
    spec = CalculatorSpec(config.teacher, config.teacher_kwargs)
    if config.site_energies:  # checked before any sampling
        check_site_energies(spec)
    if config.hessian_rows > 0:
        check_hessian_method_for(spec.teacher, config.hessian_method)
    key_config = config.cache_config()
    path, sidecar = cache_files(config.cache_dir, f"distill_{config.name()}_{file_tag(config.teacher)}", key_config)
    directory, stem, progress = path.parent, path.stem, config.progress
    with build_once(path, sidecar, key_config, progress) as build:
        if not build:
            return path
        started = time.perf_counter()
        teacher_calculator = make_calculator(config.teacher, **config.teacher_kwargs)
        sampled_path = directory / f"{stem}.sampled.extxyz"
        if sampled_path.exists():
            structures = ase.io.read(sampled_path, index=":", format="extxyz")
            announce(f"Resuming from {len(structures)} sampled structures in {sampled_path}", progress)
        else:
            where = config.system or config.seeds_path
            announce(f"Sampling {where} for distillation (teacher {config.teacher!r}) -> {path}", progress)
            driver = (
                teacher_calculator
                if config.md_driver is None
                else make_driver(config.md_driver, **config.md_driver_kwargs)
            )
            structures = sample_structures(config.teacher_seeds(teacher_calculator), driver, config)
            temporary = directory / f"{stem}.sampled.extxyz.tmp"
            ase.io.write(temporary, structures, format="extxyz")
            os.replace(temporary, sampled_path)
            # Label what the file holds (8 decimals), so an interrupted build labels the very same structures.
            structures = ase.io.read(sampled_path, index=":", format="extxyz")
        sampled = time.perf_counter()
        partial = directory / f"{stem}.partial.extxyz"
        label_structures(
            structures,
            spec if config.label_workers > 1 else teacher_calculator,
            partial,
            chunk_size=config.chunk_size,
            progress=progress,
            hessian_rows=config.hessian_rows,
            hessian_delta=config.hessian_delta,
            hessian_seed=config.seed,
            hessian_method=config.hessian_method,
            site_energies=config.site_energies,
            workers=config.label_workers,
        )
        labelled = time.perf_counter()
        commit_dataset(
            partial,
            path,
            sidecar,
            config=key_config,
            num_structures=len(structures),
            seconds_sample=round(sampled - started, 2),
            seconds_label=round(labelled - sampled, 2),
            teacher_cost=labelling_cost(partial, per_structure=True),
            label_workers=config.label_workers,
        )
        cost_path(partial).unlink(missing_ok=True)  # now in the sidecar
        sampled_path.unlink(missing_ok=True)
        announce(
            f"Distillation set ready: {path} ({len(structures)} structures; sampled in {sampled - started:.1f} s, "
            f"labelled in {labelled - sampled:.1f} s)",
            progress,
        )
    return path
