"""Figures for the observables report and the built-in water box, with a real teacher.

    python benchmarks/observables.py water --teacher chgnet        # water-box sanity: forces, time per call, MD RDF
    python benchmarks/observables.py report --teacher chgnet --system CuAu    # observables_report, student = teacher
    python benchmarks/observables.py report --teacher chgnet --system water

``water``: the largest force on fresh boxes of 12 and 36 molecules, seconds per energy+forces call at 36 and
108 atoms, and a Langevin run (0.5 fs, 300 K) of a small box whose O-O g(r) should peak near 2.8 Å.
``report``: the wall time of :func:`observables_report` with the teacher as its own student (two instances,
so no cached result is reused), on the 32-atom Cu-Au seed (EOS + frequencies) or a water box (frequencies +
RDF), and its metrics (errors must be 0). Timings depend on the machine's load: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings


def _calculator(name: str):
    from mlff_distiller.teachers.calculators import make_calculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_calculator(name)


def seconds_per_call(calculator, atoms, repeats: int = 3) -> float:
    from ase.calculators.calculator import all_changes

    calculator.calculate(atoms, ["energy", "forces"], all_changes)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        calculator.reset()
        calculator.calculate(atoms, ["energy", "forces"], all_changes)
    return (time.perf_counter() - start) / repeats


def water(args: argparse.Namespace) -> dict:
    import numpy as np

    from mlff_distiller.distill.observables import langevin_frames, radial_distribution
    from mlff_distiller.teachers.systems import water_box

    calculator = _calculator(args.teacher)
    out: dict = {"teacher": args.teacher}
    for count in (12, 36):
        largest = []
        for seed in range(3):
            atoms = water_box(count, seed=seed)
            atoms.calc = calculator
            largest.append(float(np.linalg.norm(atoms.get_forces(), axis=1).max()))
        out[f"max_force_{3 * count}_atoms_eV_A"] = largest
    for count in (12, 36):
        out[f"seconds_per_call_{3 * count}_atoms"] = seconds_per_call(calculator, water_box(count))
    start = time.perf_counter()
    frames = langevin_frames(
        calculator,
        water_box(args.molecules, seed=0),
        steps=args.md_steps,
        timestep_fs=0.5,
        temperature_K=300.0,
        equilibration_steps=args.md_equilibration,
        interval=10,
        seed=0,
    )
    rdf = radial_distribution(frames)
    out.update(
        md_molecules=args.molecules,
        md_steps=args.md_equilibration + args.md_steps,
        md_seconds=time.perf_counter() - start,
        md_frames=len(frames),
        rdf_rmax_A=float(rdf.r[-1]),
        oo_peak_A=rdf.peak_position("O-O"),
        oo_peak_height=float(rdf.g["O-O"].max()),
        intramolecular_oh_peak_A=rdf.peak_position("H-O"),
        oo_rdf={f"{r:.2f}": round(float(g), 2) for r, g in zip(rdf.r[::4], rdf.g["O-O"][::4])},
    )
    return out


def report(args: argparse.Namespace) -> dict:
    from mlff_distiller.distill.observables import observables_report
    from mlff_distiller.teachers.sampling import seed_structures
    from mlff_distiller.teachers.systems import water_box

    teacher, student = _calculator(args.teacher), _calculator(args.teacher)
    if args.system == "water":
        reference = water_box(args.molecules, seed=0)
    else:
        reference = seed_structures(args.system, num_seeds=1, min_atoms=32)[0]
    options = {"md_steps": args.md_steps, "md_equilibration_steps": args.md_equilibration}
    start = time.perf_counter()
    metrics = observables_report(student, teacher, reference, args.output, **options)
    return {"teacher": args.teacher, "system": args.system, "wall_s": time.perf_counter() - start, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("water", "report"))
    parser.add_argument("--teacher", default="emt")
    parser.add_argument("--system", default="CuAu", help="a seed_structures name (CuAu, Cu, ...) or 'water'")
    parser.add_argument("--molecules", type=int, default=12, help="water molecules in the MD / report box")
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--md-equilibration", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", default="observables_benchmark")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = water(args) if args.what == "water" else report(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
