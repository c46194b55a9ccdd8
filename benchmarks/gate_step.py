"""Time per MD step of the stability gate's student: eager against compiled (inductor), on 1 and 2 threads.

    python benchmarks/gate_step.py [--model painn --hidden 32] [--atoms 108] [--steps 300] [--checkpoint best_model.pt]

The gate (``distill_report.gate``) is Langevin NVT of a cell of at least 108 atoms through
:class:`~mlff_distiller.calculator.StudentCalculator` and ASE; this measures exactly that step for each
(threads, compile) pair, each in its own fresh process (inductor fixes its thread count when it compiles), one
after another in one run, and prints the time per step, the set-up time (the compilation, for the compiled
student) and each configuration's ratio to eager on 2 threads. A Cu-Au fcc cell, untrained student by default
(speed does not depend on the weights; ``--checkpoint`` times a trained one), its atoms displaced by 0.05 Å.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(args: argparse.Namespace, threads: int, compile: str) -> dict[str, float]:
    """Set-up seconds and ms per step of one configuration (runs in this process)."""
    import numpy as np
    import torch
    from ase import units
    from ase.build import bulk
    from ase.md.langevin import Langevin

    from mlff_distiller import StudentCalculator
    from mlff_distiller.teachers.structures import supercell

    torch.set_num_threads(threads)
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True)
    atoms = supercell(atoms, args.atoms)
    numbers = atoms.numbers.copy()
    numbers[::2] = 79
    atoms.numbers = numbers
    # Displaced as in MD: on a perfect lattice the forces vanish by symmetry, the compiled graph's first-batch
    # check against eager cannot tell round-off from a wrong graph, and the student runs eagerly (with a warning).
    atoms.rattle(0.05, seed=0)
    started = time.perf_counter()
    if args.checkpoint:
        calculator = StudentCalculator.from_checkpoint(args.checkpoint, compile=compile)
    else:
        from mlff_distiller.data.statistics import DatasetStatistics
        from mlff_distiller.models.painn import PaiNN
        from mlff_distiller.models.schnet import SchNet

        torch.manual_seed(0)
        statistics = DatasetStatistics(atomic_energies={29: -3.0, 79: -3.5}, force_rms=1.0, avg_num_neighbors=40.0)
        model = {"painn": PaiNN, "schnet": SchNet}[args.model](cutoff=5.0, hidden=args.hidden, statistics=statistics)
        calculator = StudentCalculator(model, compile=compile)
    atoms.calc = calculator
    dynamics = Langevin(atoms, 2 * units.fs, temperature_K=1350, friction=0.01, rng=np.random.default_rng(0))
    dynamics.run(20)  # the compiled graph is traced, compiled and checked here
    setup = time.perf_counter() - started
    started = time.perf_counter()
    dynamics.run(args.steps)
    return {"setup_s": setup, "ms_per_step": 1000 * (time.perf_counter() - started) / args.steps, "atoms": len(atoms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="painn", help="painn | schnet (untrained; ignored with --checkpoint)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--atoms", type=int, default=108, help="at least this many atoms (the gate's min_atoms)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # threads compile: a child run
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args, int(args.one[0]), args.one[1])))
        return
    rows = []
    for threads in (2, 1):
        for compile in ("none", "inductor"):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, __file__, *sys.argv[1:], "--one", str(threads), compile]
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            rows.append((threads, compile, json.loads(output.strip().splitlines()[-1])))
    base = rows[0][2]["ms_per_step"]
    student = args.checkpoint or f"{args.model} {args.hidden} (untrained)"
    print(f"{student}, {rows[0][2]['atoms']} atoms, {args.steps} steps")
    print("| threads | student | set-up (s) | ms per MD step | vs eager on 2 threads |")
    print("|---|---|---|---|---|")
    for threads, compile, row in rows:
        name = "compiled (inductor)" if compile == "inductor" else "eager"
        step = row["ms_per_step"]
        print(f"| {threads} | {name} | {row['setup_s']:.1f} | {step:.1f} | {step / base:.2f}x |")


if __name__ == "__main__":
    main()
