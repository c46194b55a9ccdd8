"""Teacher Hessian rows: autograd (double backward) against central finite differences of the forces, for
each installed torch teacher (CHGNet, SevenNet): agreement, and cost in teacher CPU seconds.

    python benchmarks/teacher_hessian.py [--teachers chgnet sevenn] [--rows 4] [--repeats 3] [--threads 1]

On a rattled 32-atom Cu fcc cell (a = 3.75 Å, so that no pair lies within 0.1 Å of a 5 Å cutoff, where
finite differences would straddle a change of the neighbour list), prints for each teacher:

- agreement: max |H_autograd - H_fd(delta)| over the rows, for delta = 0.02, 0.01, 0.005, 0.0025 Å,
  and against the Richardson extrapolation (4 H_fd(delta/2) - H_fd(delta)) / 3 of the last two, with
  the largest |H| entry for scale; if autograd is right the differences fall like delta² until float32
  noise (~1e-5 eV/Å / delta) takes over;
- cost (process CPU seconds, median of ``--repeats``): one energy+forces call, one finite-difference row
  (2 calls), the autograd pass with ``--rows`` rows, and the marginal cost of one more autograd row
  (from 1 and ``--rows`` rows); the ratios "FD row / autograd row" and "rows per structure at which
  autograd is cheaper" come from the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings

import numpy as np
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list

from mlff_distiller.teachers.autograd import autograd_rows_function
from mlff_distiller.teachers.calculators import make_calculator
from mlff_distiller.teachers.hessian import finite_difference_hessian_rows

DELTAS = (0.02, 0.01, 0.005, 0.0025)


def structure(seed: int = 1):
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=seed)
    distances = neighbor_list("d", atoms, 5.5)
    assert np.abs(distances - 5.0).min() > 0.1, "a pair sits near the 5 Å cutoff: pick another seed"
    return atoms


def cpu_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(name: str, rows: int, repeats: int) -> None:
    calculator = make_calculator(name)
    atoms = structure()
    coords = list(np.random.default_rng(0).choice(3 * len(atoms), size=rows, replace=False))
    autograd = autograd_rows_function(calculator)
    exact = autograd(atoms, coords)
    scale = float(np.abs(exact).max())
    print(f"\n{name}: {rows} rows of a {len(atoms)}-atom cell; max |H| = {scale:.3f} eV/Å²")
    fd = {delta: finite_difference_hessian_rows(atoms, calculator, coords, delta) for delta in DELTAS}
    for delta in DELTAS:
        print(f"  |autograd - fd({delta:g} Å)|max = {np.abs(exact - fd[delta]).max():.2e} eV/Å²")
    richardson = (4 * fd[DELTAS[-1]] - fd[DELTAS[-2]]) / 3
    print(f"  |autograd - Richardson({DELTAS[-2]:g}, {DELTAS[-1]:g})|max = {np.abs(exact - richardson).max():.2e}")
    block = exact[:, coords]
    print(f"  symmetry of the autograd rows' block: {np.abs(block - block.T).max():.1e}")

    work = atoms.copy()
    work.calc = calculator
    counter = [0]

    def single_point():
        counter[0] += 1
        work.positions[0, 0] += 1e-4 * (-1) ** counter[0]  # new positions: no cached result
        work.get_forces()

    call = cpu_seconds(single_point, repeats)
    fd_row = cpu_seconds(lambda: finite_difference_hessian_rows(atoms, calculator, coords[:1]), repeats)
    one = cpu_seconds(lambda: autograd(atoms, coords[:1]), repeats)
    many = cpu_seconds(lambda: autograd(atoms, coords), repeats)
    marginal = (many - one) / max(rows - 1, 1)
    print(f"  energy+forces call: {call:.3f} s; finite-difference row (2 calls): {fd_row:.3f} s")
    print(f"  autograd pass: {one:.3f} s with 1 row, {many:.3f} s with {rows}; one more row: {marginal:.3f} s")
    print(f"  FD row / autograd row (marginal): {fd_row / marginal:.2f}")
    # k rows: FD costs k * fd_row, autograd (one - marginal) + k * marginal.
    if fd_row > marginal:
        print(f"  autograd is cheaper from {(one - marginal) / (fd_row - marginal):.2f} rows per structure on")
    else:
        print("  autograd rows cost more than finite-difference rows here at any number of rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["chgnet", "sevenn"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in args.teachers:
        if importlib.util.find_spec(name) is None:
            print(f"\n{name}: not installed (pip install {name}); skipped")
            continue
        measure(name, args.rows, args.repeats)


if __name__ == "__main__":
    main()
