"""Parallel labelling: one process against ``--workers`` spawned worker processes (one thread each), on
the same structures with the same teacher, side by side in one run.

    python benchmarks/parallel_labelling.py [--teacher chgnet] [--structures 40] [--workers 2] [--repeats 1]

Labels ``--structures`` 32-atom Cu-Au cells (the built-in generator's) three ways, alternating over
``--repeats``: serial with 1 torch thread, serial with ``--workers`` torch threads, and ``--workers``
processes of 1 thread (worker start-up included: it is what a user pays). Prints wall seconds, the
teacher CPU seconds summed from the cost ledger, the speed-up of the workers over each serial run, and
the largest difference between the files' energies and forces (0 for a deterministic teacher; the
multi-threaded serial run may differ in the last bits).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mlff_distiller.teachers import generate_alloy_structures, label_structures, read_labelled
from mlff_distiller.teachers.calculators import CalculatorSpec
from mlff_distiller.teachers.labelling import labelling_cost


def run(structures, teacher: str, workers: int, threads: int, directory: Path, tag: str) -> tuple[float, Path]:
    torch.set_num_threads(threads)
    output = directory / f"{tag}.extxyz"
    start = time.perf_counter()
    label_structures(structures, CalculatorSpec(teacher), output, chunk_size=4, progress=False, workers=workers)
    return time.perf_counter() - start, output


def difference(a: Path, b: Path) -> float:
    worst = 0.0
    for x, y in zip(read_labelled(a), read_labelled(b)):
        worst = max(worst, abs(x.get_potential_energy() - y.get_potential_energy()))
        worst = max(worst, float(np.abs(x.get_forces() - y.get_forces()).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="chgnet")
    parser.add_argument("--structures", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    structures = generate_alloy_structures(args.structures, seed=0)
    ways = {
        "serial, 1 thread": (1, 1),
        f"serial, {args.workers} threads": (1, args.workers),
        f"{args.workers} workers x 1 thread": (args.workers, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, float] = {}
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for k, (name, (workers, threads)) in enumerate(ways.items()):
                seconds, files[name] = run(structures, args.teacher, workers, threads, Path(scratch), f"{repeat}_{k}")
                times[name].append(seconds)
                cpu[name] = labelling_cost(files[name])["teacher_cpu_seconds"]
        print(f"{args.structures} structures of {len(structures[0])} atoms, teacher {args.teacher}")
        for name in ways:
            median = statistics.median(times[name])
            print(f"  {name:<24} {median:8.2f} s wall   teacher CPU {cpu[name]:8.2f} s")
        parallel = statistics.median(times[list(ways)[2]])
        for name in list(ways)[:2]:
            print(f"  speed-up of the workers over '{name}': {statistics.median(times[name]) / parallel:.2f}x")
        names = list(ways)
        for other in names[1:]:
            print(f"  max |difference| '{names[0]}' vs '{other}': {difference(files[names[0]], files[other]):.2e}")


if __name__ == "__main__":
    main()
