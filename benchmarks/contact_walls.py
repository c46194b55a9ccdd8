"""The short-range wall of a teacher and of students: one pair of atoms pushed together.

    python benchmarks/contact_walls.py --structures FRAMES.extxyz [--index 0] [--teacher sevenn]
        [--students RUN/checkpoints/best_model.pt ...] [--fractions 1 0.9 0.8 0.7 0.6 0.5]

For each element pair of the structure, its closest pair (minimum image; in water: O-O between two molecules,
O-H and H-H within one) is pushed together along the line joining it to each fraction of its distance, each
atom by half the change with its bonded fragment (two water molecules move whole; a bond's two atoms alone), as
:func:`mlff_distiller.teachers.sampling.contact_copies` does (:func:`~mlff_distiller.teachers.sampling.push_pair`).
Printed per model: the energy above the unpushed structure (eV) and the force pushing the pair apart (eV/Å;
negative: the model pulls the pair together, a hole a long MD run can fall into). A student whose wall turns
over where the teacher's keeps rising lets atoms meet in the stability gate; ``data.source.num_contacts`` labels
that wall.
"""

from __future__ import annotations

import argparse

import numpy as np


def scan(calculator, atoms, i: int, j: int, fractions: list[float]) -> list[tuple[float, float, float]]:
    """(distance, energy above the first fraction's, push-apart force) at each fraction of the i-j distance."""
    from mlff_distiller.teachers.sampling import bonded_fragments, push_pair

    before = atoms.get_distance(i, j, mic=True, vector=True)
    distance = float(np.linalg.norm(before))
    unit = before / distance
    fragments = bonded_fragments(atoms)  # of the unpushed structure, as contact_copies takes them
    rows = []
    for fraction in fractions:
        pushed = push_pair(atoms, i, j, fraction * distance, fragments, before)
        pushed.calc = calculator
        energy = float(pushed.get_potential_energy())
        forces = pushed.get_forces()
        rows.append((fraction * distance, energy, float((forces[j] - forces[i]) @ unit / 2)))
    return [(d, e - rows[0][1], f) for d, e, f in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", required=True, help="an ASE-readable file (e.g. a run's fresh_frames.extxyz)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--teacher", default=None, help="a teacher name (make_calculator): chgnet, sevenn, emt")
    parser.add_argument("--students", nargs="*", default=[], help="checkpoints (best_model.pt) or run directories")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    args = parser.parse_args()

    import torch
    from ase.io import read

    from mlff_distiller import StudentCalculator
    from mlff_distiller.md.stability import closest_pairs, pair_name
    from mlff_distiller.teachers.calculators import make_calculator

    torch.set_num_threads(1)
    atoms = read(args.structures, args.index)
    models = [(args.teacher, make_calculator(args.teacher))] if args.teacher else []
    models += [(path, StudentCalculator.from_checkpoint(path)) for path in args.students]
    if not models:
        parser.error("give --teacher and/or --students")
    print(
        f"{args.structures} [{args.index}]: {len(atoms)} atoms; per model: distance (Å) energy (eV) push-apart (eV/Å)"
    )
    for pair, (distance, i, j) in sorted(closest_pairs(atoms).items()):
        if i == j:  # an atom and its own periodic image (a cell under the search radius): no pair to push
            continue
        print(f"\n{pair_name(pair)}: atoms {i} and {j}, {distance:.3f} Å apart")
        for name, calculator in models:
            rows = scan(calculator, atoms, i, j, args.fractions)
            print(f"  {name}")
            print("    " + "  ".join(f"{d:5.2f} {e:+7.2f} {f:+7.1f}" for d, e, f in rows))


if __name__ == "__main__":
    main()
