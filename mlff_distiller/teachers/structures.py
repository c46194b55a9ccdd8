"""Structure builders shared by the dataset generators, the distillation sampler, the active loop and the report.

Everything here is seeded by the caller's ``numpy.random.Generator`` and returns new ``Atoms``:
lattice constants and Vegard alloys (:func:`random_alloy`), random strains, supercells, clean copies
with provenance (:func:`fresh_copy`), Maxwell-Boltzmann momenta and snapshots of Langevin MD
(:func:`langevin_snapshots`). The default dataset's cache key promises the same structures for the same
settings, so the order of random draws here is part of the contract: change it only with a version bump
(``GENERATOR_VERSION`` / ``SAMPLER_VERSION``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ase import Atoms

LATTICE_CONSTANTS = {"Cu": 3.61, "Au": 4.08, "Ag": 4.09, "Ni": 3.52, "Pd": 3.89, "Pt": 3.92, "Al": 4.05}
"""Experimental fcc lattice constants, Å (elements EMT knows)."""


EOS_POINTS = 9
"""Volumes of the teacher's equation of state that places crystal seeds at its equilibrium (:func:`teacher_volume`)."""
EOS_VOLUME_RANGE = 0.1
"""... spread over V (1 ± this) around the seed's volume: a lattice constant up to ~3 % off is bracketed."""


def teacher_volume(atoms: Atoms, calculator: Any) -> tuple[float, int]:
    """(the volume at the minimum of ``calculator``'s energy, teacher calls spent) for a periodic ``atoms``
    scaled isotropically with fractional coordinates fixed (``ase.eos``, Birch-Murnaghan, :data:`EOS_POINTS`
    volumes over ±:data:`EOS_VOLUME_RANGE`). Raises ``ValueError`` naming the volumes when the minimum lies
    outside them (the seed is too far from the teacher's density to place it there by this fit)."""
    from ase.eos import EquationOfState

    volume = atoms.get_volume()
    volumes = volume * (1.0 + np.linspace(-EOS_VOLUME_RANGE, EOS_VOLUME_RANGE, EOS_POINTS))
    energies = []
    for target in volumes:
        scaled = fresh_copy(atoms)
        scaled.set_cell(atoms.cell.array * (target / volume) ** (1.0 / 3.0), scale_atoms=True)
        scaled.calc = calculator
        energies.append(float(scaled.get_potential_energy()))
    v0 = float(EquationOfState(volumes, np.array(energies), eos="birchmurnaghan").fit(warn=False)[0])
    if not (np.isfinite(v0) and volumes[0] <= v0 <= volumes[-1]):
        raise ValueError(
            f"The teacher's energy has no minimum within {volumes[0]:.2f}-{volumes[-1]:.2f} Å³ around the seed's "
            f"{volume:.2f} Å³ (fit: {v0:.2f} Å³); give seeds near the teacher's density "
            "(data.source.seeds_path) or keep them as given (data.source.seed_volume=given)."
        )
    return v0, EOS_POINTS


def default_timestep_fs(atoms: Atoms) -> float:
    """MD timestep when none is given: 0.5 fs with hydrogen (fast vibrations), else 2 fs."""
    return 0.5 if 1 in atoms.numbers else 2.0


def random_strain(rng: np.random.Generator, strain_max: float) -> np.ndarray:
    """I + symmetric strain with components uniform in [-strain_max, strain_max]."""
    strain = rng.uniform(-strain_max, strain_max, size=(3, 3))
    return np.eye(3) + 0.5 * (strain + strain.T)


def lattice_constant(symbol: str, structure: str) -> float:
    """Å: :data:`LATTICE_CONSTANTS` for fcc elements listed there, else ASE's reference state when its
    symmetry is ``structure``; a ``ValueError`` otherwise."""
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


def random_alloy(
    lattice: Atoms,
    solute: str,
    fraction_range: Sequence[float],
    lattice_constants: tuple[float, float],
    rng: np.random.Generator,
    strain_max: float = 0.0,
) -> Atoms:
    """A random substitutional alloy on ``lattice`` (host atoms on a cell of lattice constant 1).

    Draws the solute fraction uniformly from ``fraction_range``, puts ``round(fraction * n)`` solute atoms
    on random sites, scales the cell to Vegard's lattice constant between ``lattice_constants`` (host,
    solute) and, with ``strain_max > 0``, applies a random symmetric strain (components up to
    ``strain_max``). Random draws, in this order: fraction, site permutation, strain.
    """
    from ase.data import atomic_numbers

    atoms = lattice.copy()
    n = len(atoms)
    n_solute = int(round(rng.uniform(*fraction_range) * n))
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(n)[:n_solute]] = atomic_numbers[solute]
    atoms.numbers = numbers
    x = n_solute / n
    cell = atoms.cell.array * ((1 - x) * lattice_constants[0] + x * lattice_constants[1])
    if strain_max > 0:
        cell = cell @ random_strain(rng, strain_max)
    atoms.set_cell(cell, scale_atoms=True)
    return atoms


def fresh_copy(atoms: Atoms, **info: Any) -> Atoms:
    """Copy of ``atoms`` without calculator, velocities or constraints; positions wrapped into the cell;
    ``info`` entries added to (a copy of nothing else from) ``atoms.info``."""
    from ase import Atoms as AseAtoms

    out = AseAtoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.wrap()
    out.info.update(info)
    return out


def supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    """Repeat ``atoms`` along its shortest (repeated) lattice vector until it has at least ``min_atoms``."""
    repeat = np.ones(3, dtype=int)
    lengths = atoms.cell.lengths()
    while len(atoms) * repeat.prod() < min_atoms:
        repeat[int(np.argmin(lengths * repeat))] += 1
    return atoms.repeat(tuple(repeat))


def min_distance(atoms: Atoms) -> float:
    """The smallest interatomic distance (minimum image when periodic), Å; inf for a single atom."""
    if len(atoms) < 2:
        return float("inf")
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    return float(distances[np.triu_indices(len(atoms), k=1)].min())


def maxwell_boltzmann_momenta(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> np.ndarray:
    """Momenta (ASE units) drawn from the Maxwell-Boltzmann distribution at ``temperature_K``, without
    centre-of-mass motion. Written out because ASE renamed its helper in 3.29."""
    from ase import units

    masses = atoms.get_masses()[:, None]
    momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    return momenta - masses * (momenta.sum(0) / masses.sum())


def langevin_snapshots(
    atoms: Atoms,
    rng: np.random.Generator,
    temperature: float,
    count: int,
    timestep_fs: float,
    friction_per_fs: float,
    equilibration_steps: int,
    interval: int,
    calculator: Any | None = None,
) -> list[Atoms]:
    """``count`` snapshots, one every ``interval`` steps after ``equilibration_steps``, of a Langevin run
    from Maxwell-Boltzmann momenta at ``temperature`` (K) driven by ``calculator`` (default: EMT)."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    atoms = atoms.copy()
    atoms.calc = EMT() if calculator is None else calculator
    atoms.set_momenta(maxwell_boltzmann_momenta(atoms, temperature, rng))
    atoms.set_constraint(FixCom())  # ASE's recommended replacement for Langevin(fixcm=True)
    dynamics = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature,
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    dynamics.run(equilibration_steps)
    snapshots = []
    for _ in range(count):
        dynamics.run(interval)
        snapshots.append(atoms.copy())
    return snapshots


def system_kind(atoms: Atoms) -> str:
    """``"molecule"`` (not periodic), ``"liquid"`` (a periodic box of separate molecules: bonded clusters,
    some of two or more atoms; liquid or molecular solid) or ``"crystal"`` (any other periodic cell).

    Bonds are ASE's natural cutoffs (covalent radii) x 1.2, so O-H (0.97 Å) is a bond and a hydrogen bond
    (1.8 Å) is not, while metals, ionic and covalent solids form one network (or, alkali and noble-gas
    solids, only single atoms): both are crystals.
    """
    from ase.neighborlist import build_neighbor_list, natural_cutoffs
    from scipy.sparse.csgraph import connected_components

    if not atoms.pbc.any():
        return "molecule"
    if not atoms.pbc.all():
        raise ValueError(
            f"Observables need a fully periodic or a non-periodic structure; this one has pbc={atoms.pbc}."
        )
    neighbors = build_neighbor_list(atoms, natural_cutoffs(atoms, mult=1.2), self_interaction=False, bothways=True)
    count, labels = connected_components(neighbors.get_connectivity_matrix(sparse=True), directed=False)
    sizes = np.bincount(labels)
    return "liquid" if count > 1 and sizes.max() > 1 else "crystal"
