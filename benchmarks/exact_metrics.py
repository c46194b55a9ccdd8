"""How far the previous metric averaging was from the exact metrics on a mixed-size data set.

    python benchmarks/exact_metrics.py [--epochs 12] [--batch-sizes 16 50]

Builds an EMT-labelled set mixing non-periodic Cu-Au octahedra of 19, 44 and 85 atoms with periodic 32-atom
fcc cells (rattled; a file as users bring them), trains a small SchNet on it, and evaluates the test split
exactly (sums and counts over every force component / structure, as the Trainer and mlff-eval now report) and
with the previous averaging (batch means, RMSEs as batch RMSEs, averaged with structure weights) for several
evaluation batch sizes (50 is data=file's default) and two orders of the test structures: grouped by kind, as
many published files are, and random, as a split drawn from one file is. Prints the figures and the relative
error of the previous ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "evaluation"))
from evalkit import write_mixed  # noqa: E402  (the tests' mixed-size set: 19/44/85-atom clusters, 32-atom cells)

from mlff_distiller.data import keys  # noqa: E402
from mlff_distiller.data.batch import collate_atoms  # noqa: E402
from mlff_distiller.data.module import AtomsDataModule  # noqa: E402
from mlff_distiller.evaluation import evaluate_structures  # noqa: E402
from mlff_distiller.losses.energy_force import EnergyForceLoss  # noqa: E402
from mlff_distiller.models.schnet import SchNet  # noqa: E402
from mlff_distiller.training import Trainer, TrainingConfig  # noqa: E402

METRICS = ("energy_mae_per_atom", "energy_rmse_per_atom", "force_mae", "force_rmse")


def previous_averaging(model: torch.nn.Module, graphs: list[dict], batch_size: int) -> dict[str, float]:
    """The metrics as reported before: per-batch means (RMSE: the batch's RMSE) averaged with structure weights,
    over ``graphs`` batched in the given order."""
    model.eval()
    sums, structures = dict.fromkeys(METRICS, 0.0), 0
    for start in range(0, len(graphs), batch_size):
        batch = collate_atoms(graphs[start : start + batch_size])
        out = model(batch)
        energy = (out[keys.ENERGY] - batch[keys.ENERGY]).detach().double() / batch[keys.NUM_ATOMS]
        forces = (out[keys.FORCES] - batch[keys.FORCES]).detach().double()
        n = len(batch)
        sums["energy_mae_per_atom"] += n * 1e3 * float(energy.abs().mean())
        sums["energy_rmse_per_atom"] += n * 1e3 * float(energy.pow(2).mean().sqrt())
        sums["force_mae"] += n * 1e3 * float(forces.abs().mean())
        sums["force_rmse"] += n * 1e3 * float(forces.pow(2).mean().sqrt())
        structures += n
    return {name: total / structures for name, total in sums.items()}


def orders(data: AtomsDataModule) -> dict[str, list[dict]]:
    """The test graphs as a file grouped by kind (clusters by size, then cells) and in random order (a drawn split)."""
    graphs = data.datasets["test"].graphs
    kinds = [atoms.info["config_type"] for atoms in data.structures("test")]
    grouped = [graphs[i] for i in sorted(range(len(graphs)), key=lambda i: (kinds[i], i))]
    shuffled = [graphs[i] for i in np.random.default_rng(0).permutation(len(graphs))]
    return {"grouped by kind": grouped, "random order": shuffled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=120, help="training structures")
    parser.add_argument("--test", type=int, default=100, help="test structures")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        data = AtomsDataModule(
            path=str(write_mixed(Path(directory) / "train.extxyz", args.train, seed=1)),
            val_path=str(write_mixed(Path(directory) / "val.extxyz", 20, seed=2)),
            test_path=str(write_mixed(Path(directory) / "test.extxyz", args.test, seed=3)),
            cutoff=4.5,
            batch_size=8,
            val_batch_size=20,
        )
        print(
            f"data: {time.perf_counter() - start:.0f} s; sizes in the test file: 19/44/85-atom clusters, 32-atom cells"
        )
        model = SchNet(cutoff=4.5, hidden=32, interactions=2, statistics=data.statistics)
        config = TrainingConfig(
            max_epochs=args.epochs,
            learning_rate=5e-3,
            lr_scheduler="cosine",
            ema_decay=0.99,
            checkpoint_dir=None,
            log_interval=1000,
            device="cpu",
        )
        loss = EnergyForceLoss(energy_weight=10.0, force_weight=30.0)
        start = time.perf_counter()
        Trainer(model, data.train_loader(), data.val_loader(), config=config, loss_fn=loss, loggers=[]).fit()
        print(f"training: {args.epochs} epochs, {time.perf_counter() - start:.0f} s")
        model.eval()
        exact = evaluate_structures(model, data.structures("test")).metrics
        previous = {
            (order, size): previous_averaging(model, graphs, size)
            for order, graphs in orders(data).items()
            for size in args.batch_sizes
        }

    columns = list(previous)
    header = "".join(f"{f'{order}, batch {size}':>26}" for order, size in columns)
    print(f"\nprevious averaging vs exact (test split)\n{'metric':<22}{'exact':>9}{header}")
    for name in METRICS:
        row = "".join(
            f"{previous[c][name]:>17.2f} ({100 * (previous[c][name] / exact[name] - 1):+5.1f}%)" for c in columns
        )
        print(f"{name:<22}{exact[name]:>9.2f}{row}")
    groups = sorted(k for k in exact if k.startswith("force_mae/config_type="))
    print("\nexact force MAE per config type: " + ", ".join(f"{k.split('=')[1]} {exact[k]:.1f}" for k in groups))
    print(f"force spread (std of the test labels): {exact['force_std']:.0f} meV/Å; units meV/atom and meV/Å")
    print(f"test structures: {int(exact['num_structures'])}, atoms: {int(exact['num_atoms'])}")


if __name__ == "__main__":
    main()
