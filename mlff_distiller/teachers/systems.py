"""Built-in systems beyond crystals and single molecules: a periodic box of liquid water.

:func:`water_box` is the second system class of the distillation recipes (the first is the Cu-Au alloy):
periodic, liquid, made of molecules, so a recipe that works on it is not tuned to metals, and its
radial distribution function is a structural observable to compare student and teacher on. The
sampler knows it by name: ``seed_structures(system="water")`` (``"H2O"`` stays the single molecule).

Sizes: 36 molecules (108 atoms, a 10.3 Å cube at 1 g/cm³; the default) is the box for MD, the
stability gate and the RDF (its half-width, 5.1 Å, covers the first two O-O shells); 8-16 molecules
(a 6.2-7.8 Å cube) is the cheap size for labelling and for Gamma-point frequencies, whose finite
differences cost 6 calls per atom. Every calculator used here is periodic, so a box smaller than
twice the teacher's cutoff is still valid: its periodic images are part of the system.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ase import Atoms

WATER_MOLAR_MASS = 18.015
"""g/mol (ASE's atomic masses of H2O)."""


def box_length(num_molecules: int, density_g_cm3: float, molar_mass: float = WATER_MOLAR_MASS) -> float:
    """Edge (Å) of the cube holding ``num_molecules`` molecules of ``molar_mass`` g/mol at ``density_g_cm3``."""
    from ase import units

    grams = num_molecules * molar_mass / units._Nav
    return float((grams / density_g_cm3 * 1e24) ** (1.0 / 3.0))


def water_box(
    num_molecules: int = 36,
    density_g_cm3: float = 1.0,
    seed: int = 0,
    min_distance: float = 1.7,
    min_oxygen_distance: float = 2.5,
    max_attempts: int = 20_000,
    max_restarts: int = 20,
) -> Atoms:
    """A cubic periodic box of ``num_molecules`` rigid water molecules at ``density_g_cm3``, seeded.

    Molecules have ASE's gas-phase geometry (``ase.build.molecule("H2O")``: O-H 0.969 Å, H-O-H 104.0°),
    uniformly random orientations and centres, inserted one by one: a trial placement is kept only if
    no atom of it is closer than ``min_distance`` (Å) to an atom of another molecule, and its oxygen no
    closer than ``min_oxygen_distance`` (Å) to another oxygen, both by minimum image (periodic images of
    the molecule itself included). The defaults sit just below liquid water's closest approaches
    (hydrogen-bonded O...H ~1.8 Å, the O-O first shell from ~2.5 Å), so the box starts without
    overlaps and its forces stay moderate (CHGNet, SevenNet: below ~2 eV/Å); MD then forms the
    hydrogen-bond network. Random sequential insertion can jam: a molecule that finds no room in
    ``max_attempts`` trials restarts the box, up to ``max_restarts`` times, continuing the seeded stream
    (with the defaults at 1 g/cm³ a first start succeeded for 10 of 10 seeds at 12, 36 and 108
    molecules). Atoms are ordered O, H, H per molecule; positions are wrapped into the cell; the same
    arguments give the same box.
    """
    from ase import Atoms
    from ase.build import molecule

    if int(num_molecules) != num_molecules or num_molecules < 1:
        raise ValueError(f"water_box: num_molecules={num_molecules!r} is invalid; it must be an integer >= 1.")
    for name, value in (
        ("density_g_cm3", density_g_cm3),
        ("min_distance", min_distance),
        ("min_oxygen_distance", min_oxygen_distance),
    ):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"water_box: {name}={value!r} is invalid; it must be a finite number > 0.")
    template = molecule("H2O")
    local = template.positions - template.get_center_of_mass()
    length = box_length(int(num_molecules), density_g_cm3)
    extent = float(np.linalg.norm(local[:, None] - local[None], axis=-1).max())
    # A molecule's own periodic images are other molecules too: they are at least length - extent away.
    if length - extent < min_distance or length < min_oxygen_distance:
        raise ValueError(
            f"water_box: {num_molecules} molecules at {density_g_cm3} g/cm³ make a {length:.2f} Å box, too small for "
            f"a molecule to keep min_distance={min_distance} Å / min_oxygen_distance={min_oxygen_distance} Å from "
            "its own periodic images; use more molecules."
        )
    rng = np.random.default_rng(seed)
    is_oxygen = template.numbers == 8
    bounds = (length, min_distance, min_oxygen_distance)
    for _ in range(max_restarts + 1):
        # Random sequential insertion can jam; a fresh start (same seeded stream) rarely does twice.
        positions = _insert(rng, local, is_oxygen, int(num_molecules), max_attempts, *bounds)
        if positions is not None:
            break
    else:
        raise RuntimeError(
            f"water_box: could not place {num_molecules} molecules in {max_restarts + 1} starts of {max_attempts} "
            f"trials per molecule (density {density_g_cm3} g/cm³, min_distance={min_distance} Å, "
            f"min_oxygen_distance={min_oxygen_distance} Å); lower the density or the distance bounds."
        )
    symbols = template.get_chemical_symbols() * int(num_molecules)
    atoms = Atoms(symbols, positions=positions, cell=np.eye(3) * length, pbc=True)
    atoms.wrap()
    return atoms


def _insert(
    rng: np.random.Generator,
    local: np.ndarray,
    is_oxygen: np.ndarray,
    num_molecules: int,
    max_attempts: int,
    length: float,
    min_distance: float,
    min_oxygen_distance: float,
    batch: int = 64,
) -> np.ndarray | None:
    """Positions of ``num_molecules`` copies of ``local`` placed one by one, or None when one finds no room in
    ``max_attempts`` trials (drawn ``batch`` at a time; the first that fits is kept)."""
    from scipy.spatial.transform import Rotation

    placed = np.zeros((0, 3))
    placed_oxygen = np.zeros(0, dtype=bool)
    for _ in range(num_molecules):
        for _ in range(max(1, max_attempts // batch)):
            rotations = Rotation.from_quat(rng.normal(size=(batch, 4))).as_matrix()  # uniform on SO(3)
            trials = np.einsum("aj,bij->bai", local, rotations) + rng.uniform(0.0, length, size=(batch, 1, 3))
            fits = _fits(trials, is_oxygen, placed, placed_oxygen, length, min_distance, min_oxygen_distance)
            if fits.any():
                placed = np.concatenate([placed, trials[int(np.argmax(fits))]])
                placed_oxygen = np.concatenate([placed_oxygen, is_oxygen])
                break
        else:
            return None
    return placed


def _fits(
    trials: np.ndarray,
    trial_oxygen: np.ndarray,
    placed: np.ndarray,
    placed_oxygen: np.ndarray,
    length: float,
    min_distance: float,
    min_oxygen_distance: float,
) -> np.ndarray:
    """Which trial molecules (batch x atoms x 3) keep the distance bounds to the atoms placed before them."""
    if not len(placed):
        return np.ones(len(trials), dtype=bool)
    delta = trials[:, :, None] - placed[None, None]
    delta -= length * np.round(delta / length)  # nearest image, exact per component in a cube
    distance = np.linalg.norm(delta, axis=-1)  # batch x trial atoms x placed atoms
    both_oxygen = trial_oxygen[:, None] & placed_oxygen[None]
    too_close = (distance < min_distance) | (both_oxygen[None] & (distance < min_oxygen_distance))
    return ~too_close.any(axis=(1, 2))


def water_seeds(min_atoms: int = 32, num_seeds: int = 4, seed: int = 0, density_g_cm3: float = 1.0) -> list[Atoms]:
    """``num_seeds`` independent :func:`water_box` es of ``ceil(min_atoms / 3)`` molecules each, as the seeds of
    ``seed_structures(system="water")``; ``atoms.info["provenance"]`` is ``"seed:water=<molecules>:index=<k>"``."""
    count = max(1, -(-int(min_atoms) // 3))
    boxes = []
    for index in range(num_seeds):
        box_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        atoms = water_box(count, density_g_cm3=density_g_cm3, seed=box_seed)
        atoms.info["provenance"] = f"seed:water={count}:index={index}"
        boxes.append(atoms)
    return boxes
