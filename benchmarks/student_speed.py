"""Student speed: single-point energy + forces per second of SchNet and PaiNN students against the
EMT teacher (and CHGNet / SevenNet teachers when installed), on the same Cu-Au fcc cells.

    python benchmarks/student_speed.py [--sizes 32 256 2048] [--threads 2] [--repeats 5]

Students run untrained (speed does not depend on the weights) through `StudentCalculator`, as a user
would run MD with them. Prints calls/s per model and size, the student/teacher ratios, and the
time per atom (linear scaling means a flat column).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import time

import numpy as np
import torch
from ase.build import bulk


def cell(atoms_count: int, seed: int = 0):
    repeats = {32: (2, 2, 2), 256: (4, 4, 4), 2048: (8, 8, 8), 108: (3, 3, 3), 864: (6, 6, 6)}[atoms_count]
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * repeats
    rng = np.random.default_rng(seed)
    symbols = np.array(atoms.get_chemical_symbols())
    symbols[rng.random(len(atoms)) < 0.3] = "Au"
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.rattle(0.05, seed=seed)
    return atoms


def calls_per_second(calculator, atoms, repeats: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    times = []
    for step in range(repeats + 1):
        atoms.positions[0, 0] += 1e-4  # a new geometry every call: no cached results
        start = time.perf_counter()
        atoms.get_potential_energy()
        atoms.get_forces()
        if step:  # the first call warms up
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ase.calculators.emt import EMT

    from mlff_distiller.calculator import StudentCalculator
    from mlff_distiller.data.statistics import DatasetStatistics
    from mlff_distiller.models.painn import PaiNN
    from mlff_distiller.models.schnet import SchNet

    stats = DatasetStatistics(atomic_energies={29: -0.3, 79: -0.2}, force_rms=1.0, avg_num_neighbors=43.0)
    models = {
        "SchNet 64x3": StudentCalculator(SchNet(statistics=stats)),
        "PaiNN 64x3": StudentCalculator(PaiNN(statistics=stats)),
        "EMT teacher": EMT(),
    }
    for name, module, build in (
        ("CHGNet teacher", "chgnet", "chgnet.model.dynamics:CHGNetCalculator"),
        ("SevenNet-0 teacher", "sevenn", "sevenn.calculator:SevenNetCalculator"),
    ):
        if importlib.util.find_spec(module) is not None:
            mod, cls = build.split(":")
            models[name] = getattr(importlib.import_module(mod), cls)()
    rates: dict[str, dict[int, float]] = {name: {} for name in models}
    for size in args.sizes:
        atoms = cell(size)
        for name, calculator in models.items():
            rates[name][size] = calls_per_second(calculator, atoms, args.repeats if size < 1000 else 2)
    print(f"energy+forces calls per second ({args.threads} threads; median of {args.repeats})")
    print(f"{'model':<20}" + "".join(f"{n:>12}" for n in args.sizes) + "   µs/atom at each size")
    for name, by_size in rates.items():
        per_atom = " ".join(f"{1e6 / (r * n):.1f}" for n, r in by_size.items())
        print(f"{name:<20}" + "".join(f"{by_size[n]:>12.1f}" for n in args.sizes) + f"   {per_atom}")
    for teacher in [n for n in rates if "teacher" in n]:
        for student in ("SchNet 64x3", "PaiNN 64x3"):
            ratio = ", ".join(f"{n} atoms {rates[student][n] / rates[teacher][n]:.2f}x" for n in args.sizes)
            print(f"{student} vs {teacher}: {ratio}")


if __name__ == "__main__":
    main()
