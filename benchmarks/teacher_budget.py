"""More from the teacher per call: students trained on what the same teacher budget buys, side by side.

    python benchmarks/teacher_budget.py [--budget 300] [--steps 600] [--test 100] [--teacher emt] [--seed 0]

A budget of ``--budget`` teacher calls (energy+forces evaluations, as the labelling counts them) buys:

- ``ef``: that many structures with energy, forces and stress;
- ``ef+sites``: the same structures with the teacher's site energies too (free: the same call gives
  them), trained with ``loss.site_energy_weight``;
- ``ef+hessian``: a third as many structures, each with one finite-difference Hessian row (2 more
  calls), trained with ``loss=energy_force_hessian``;
- ``ef+hessian-ag`` (teachers with autograd rows: CHGNet, SevenNet): half as many structures, each with
  one autograd row (1 more call by the count; its backward pass shows in the CPU seconds, which is the
  fairer currency for this arm).

Each arm labels its structures (Cu-Au cells from the built-in generator, seed ``--seed``), checks the
calls it spent from the labelling ledger, trains the same student (``mlff-train data=file``, SchNet 32x2)
for the same number of optimizer steps, and evaluates its best checkpoint on one common test set
(``--test`` structures of another seed, labelled by the same teacher). Prints per arm: structures,
teacher calls and CPU seconds, test energy MAE (meV/atom) and force MAE (meV/Å).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mlff_distiller.teachers import generate_alloy_structures, label_structures, read_labelled
from mlff_distiller.teachers.calculators import TEACHERS, make_calculator
from mlff_distiller.teachers.labelling import labelling_cost

BATCH = 8
ARMS = {
    "ef": {"structures": 1.0, "label": {}, "train": []},
    "ef+sites": {"structures": 1.0, "label": {"site_energies": True}, "train": ["loss.site_energy_weight=10.0"]},
    "ef+hessian": {
        "structures": 1 / 3,
        "label": {"hessian_rows": 1, "hessian_method": "fd"},
        "train": ["loss=energy_force_hessian", "loss.hessian_weight=1.0"],
    },
    "ef+hessian-ag": {
        "structures": 1 / 2,
        "label": {"hessian_rows": 1, "hessian_method": "autograd"},
        "train": ["loss=energy_force_hessian", "loss.hessian_weight=1.0"],
    },
}


def evaluate(checkpoint: Path, test_file: Path) -> tuple[float, float]:
    """Test energy MAE per atom (meV/atom) and force MAE (meV/Å) of a checkpoint."""
    from mlff_distiller import StudentCalculator

    calculator = StudentCalculator.from_checkpoint(checkpoint)
    energy_errors, force_errors = [], []
    for atoms in read_labelled(test_file):
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = calculator
        energy_errors.append(abs(atoms.get_potential_energy() - energy) / len(atoms))
        force_errors.append(np.abs(atoms.get_forces() - forces).ravel())
    return 1e3 * float(np.mean(energy_errors)), 1e3 * float(np.concatenate(force_errors).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--teacher", default="emt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mlff_train = str(Path(sys.executable).parent / "mlff-train")
    pool = generate_alloy_structures(args.budget, seed=args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        test_file = label_structures(
            generate_alloy_structures(args.test, seed=args.seed + 1000),
            make_calculator(args.teacher),
            scratch / "test.extxyz",
            progress=False,
        )
        rows = []
        autograd = TEACHERS[args.teacher].autograd_hessian
        for name, arm in ARMS.items():
            if arm["label"].get("hessian_method") == "autograd" and not autograd:
                continue
            count = int(round(args.budget * arm["structures"]))
            path = label_structures(
                pool[:count], make_calculator(args.teacher), scratch / f"{name}.extxyz", progress=False, **arm["label"]
            )
            cost = labelling_cost(path)
            num_val = max(count // 10, 2)
            epochs = math.ceil(args.steps / math.ceil((count - num_val) / BATCH))
            run_dir = scratch / f"run_{name}"
            command = [
                mlff_train,
                "data=file",
                f"data.path={path}",
                f"data.num_val={num_val}",
                "data.num_test=0",
                "model.hidden=32",
                "model.interactions=2",
                f"trainer.batch_size={BATCH}",
                f"trainer.max_epochs={epochs}",
                "logger=none",
                f"seed={args.seed}",
                f"hydra.run.dir={run_dir}",
                *arm["train"],
            ]
            subprocess.run(command, check=True, capture_output=True, text=True)
            energy_mae, force_mae = evaluate(run_dir / "checkpoints" / "best_model.pt", test_file)
            rows.append((name, count, cost["teacher_calls"], cost["teacher_cpu_seconds"], energy_mae, force_mae))
    print(f"budget {args.budget} teacher calls ({args.teacher}), ~{args.steps} steps, {args.test} test structures")
    print(f"{'arm':<12} {'structures':>10} {'calls':>6} {'CPU s':>7} {'E MAE meV/atom':>15} {'F MAE meV/Å':>12}")
    for name, count, calls, cpu, energy_mae, force_mae in rows:
        print(f"{name:<12} {count:>10} {calls:>6} {cpu:>7.2f} {energy_mae:>15.2f} {force_mae:>12.1f}")


if __name__ == "__main__":
    main()
