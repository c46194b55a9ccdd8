"""Student speed: single-point energy + forces per second of SchNet and PaiNN students against the
EMT teacher (and CHGNet / SevenNet teachers when installed), on the same Cu-Au fcc cells
(32, 256 and 2048 atoms), with the peak memory of a call.

    python benchmarks/student_speed.py [--sizes 32 256 2048] [--threads 2] [--repeats 5] [--models ...]

Students run untrained (speed does not depend on the weights) through `StudentCalculator`, as a user
would run MD with them; every call sees new positions (neighbour list included). Each model and
size runs in a fresh process, so its peak memory is the rise of the peak resident set size over
the process's size before the first call. Prints calls/s, the time per atom (linear scaling: a
flat row; the 2048/256 ratio is 1.0), peak memory and the student/teacher ratios.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
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


MODELS = {
    "SchNet 64x3": "schnet",
    "PaiNN 64x3": "painn",
    "EMT teacher": "emt",
    "CHGNet teacher": "chgnet",
    "SevenNet-0 teacher": "sevenn",
}


def calculator(key: str):
    if key in ("schnet", "painn"):
        from mlff_distiller.calculator import StudentCalculator
        from mlff_distiller.data.statistics import DatasetStatistics
        from mlff_distiller.models.painn import PaiNN
        from mlff_distiller.models.schnet import SchNet

        stats = DatasetStatistics(atomic_energies={29: -0.3, 79: -0.2}, force_rms=1.0, avg_num_neighbors=43.0)
        return StudentCalculator({"schnet": SchNet, "painn": PaiNN}[key](statistics=stats))
    if key == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if key == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator()
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator()


def child(key: str, size: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    calc, atoms = calculator(key), cell(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rate = calls_per_second(calc, atoms, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"rate": rate, "peak_mb": peak / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="calls per model and size (2 above 1000 atoms)")
    parser.add_argument("--models", nargs="+", default=list(MODELS.values()), help="schnet painn emt chgnet sevenn")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.repeats, args.threads)
    names = {}
    for name, key in MODELS.items():
        if key not in args.models:
            continue
        if key in ("chgnet", "sevenn") and importlib.util.find_spec(key) is None:
            print(f"{name}: {key} is not installed; skipped.")
            continue
        names[name] = key
    rates: dict[str, dict[int, float]] = {name: {} for name in names}
    peaks: dict[str, dict[int, float]] = {name: {} for name in names}
    for size in args.sizes:
        for name, key in names.items():
            repeats = args.repeats if size < 1000 else 2
            command = [sys.executable, __file__, "--child", key, str(size), "--repeats", str(repeats)]
            out = subprocess.run(command + ["--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode:
                print(f"{name} at {size} atoms failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rates[name][size], peaks[name][size] = result["rate"], result["peak_mb"]
    print(f"energy+forces calls per second ({args.threads} threads; median of {args.repeats}, 2 above 1000 atoms)")
    header = "".join(f"{n:>9}" for n in args.sizes)
    width = 9 * len(args.sizes)
    print(f"{'model':<20}{header}  |{'µs/atom at each size':>{width}}  |{'peak MB':>{width}}")
    for name in names:
        r, m = rates[name], peaks[name]
        cols = "".join(f"{r[n]:>9.1f}" if n in r else f"{'-':>9}" for n in args.sizes)
        per_atom = "".join(f"{1e6 / (r[n] * n):>9.0f}" if n in r else f"{'-':>9}" for n in args.sizes)
        memory = "".join(f"{m[n]:>9.0f}" if n in m else f"{'-':>9}" for n in args.sizes)
        print(f"{name:<20}{cols}  |{per_atom}  |{memory}")
    big, small = max(args.sizes), sorted(args.sizes)[-2] if len(args.sizes) > 1 else None
    for name in names:
        r = rates[name]
        if small and big in r and small in r:
            ratio = (r[small] * small) / (r[big] * big)
            print(f"{name}: time per atom at {big} / at {small} atoms = {ratio:.2f} (linear scaling: 1.0)")
    for teacher in [n for n in names if "teacher" in n]:
        for student in [n for n in names if "teacher" not in n]:
            common = [n for n in args.sizes if n in rates[student] and n in rates[teacher]]
            ratio = ", ".join(f"{n} atoms {rates[student][n] / rates[teacher][n]:.2f}x" for n in common)
            print(f"{student} vs {teacher}: {ratio}")


if __name__ == "__main__":
    main()
