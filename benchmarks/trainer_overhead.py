"""Trainer overhead: the same student (SchNet, default size), data (default Cu-Au EMT set), optimizer
and scheduler trained by a minimal hand-written loop and by `Trainer` (TensorBoard logging,
checkpoints every epoch, validation every epoch, NaN guard, gradient clipping in both). Runs
alternate so drift in machine speed hits both sides alike.

    python benchmarks/trainer_overhead.py [--repeats 3] [--epochs 2] [--threads 1] [--ema]

Prints a table of median optimizer-step time and total time per side, and the Trainer/bare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.generate import build_default_dataset
from mlff_distiller.training import Callback, TensorBoardLogger, Trainer, TrainingConfig

DATA: AtomsDataModule | None = None


def make(seed: int = 0):
    """The default student (SchNet 64x3) on 200 training structures of the default Cu-Au set."""
    global DATA
    if DATA is None:
        path = build_default_dataset(num_structures=1100, progress=False)
        DATA = AtomsDataModule(path=str(path), cutoff=5.0, num_val=50, num_test=0, num_train=200, batch_size=16)
    torch.manual_seed(seed)
    return SchNet(cutoff=5.0, statistics=DATA.statistics), DATA, EnergyForceLoss()


def bare_loop(epochs: int) -> tuple[list[float], float]:
    model, data, loss_fn = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train_loader, val_loader = data.train_loader(), data.val_loader()
    steps: list[float] = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        last = time.perf_counter()
        for batch in train_loader:
            loss = loss_fn(model, batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        model.eval()
        for batch in val_loader:
            loss_fn(model, batch)["loss"].item()
        scheduler.step()
    return steps, time.perf_counter() - start


class StepTimer(Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.last = 0.0

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def on_optimizer_step(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now


def with_trainer(epochs: int, ema: bool) -> tuple[list[float], float]:
    model, data, loss_fn = make()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainingConfig(
            max_epochs=epochs,
            learning_rate=1e-3,
            optimizer="adam",
            lr_scheduler="cosine",
            grad_clip=10.0,
            checkpoint_dir=str(Path(run_dir) / "checkpoints"),
            log_interval=10,
            ema_decay=0.99 if ema else None,
            batch_size=16,
        )
        trainer = Trainer(
            model=model,
            train_loader=data.train_loader(),
            val_loader=data.val_loader(),
            config=config,
            device="cpu",
            loss_fn=loss_fn,
            callbacks=[timer],
            loggers=[TensorBoardLogger(Path(run_dir) / "tensorboard")],
        )
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
    return timer.steps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ema", action="store_true", help="EMA on in the Trainer (the bare loop has none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bare_loop(1), with_trainer(1, args.ema)  # warm-up: imports, allocator, tensorboard
    results: dict[str, dict[str, list[float]]] = {
        "bare": {"step": [], "total": []},
        "trainer": {"step": [], "total": []},
    }
    for _ in range(args.repeats):
        for name, run in (
            ("bare", lambda: bare_loop(args.epochs)),
            ("trainer", lambda: with_trainer(args.epochs, args.ema)),
        ):
            steps, total = run()
            results[name]["step"].append(statistics.median(steps))
            results[name]["total"].append(total)
    print(
        f"{'loop':<10}{'median step (ms)':>18}{'total (s)':>12}   [{args.repeats} alternating runs, "
        f"{args.epochs} epochs, {args.threads} thread(s), EMA {'on' if args.ema else 'off'}]"
    )
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    for name in ("bare", "trainer"):
        print(f"{name:<10}{1e3 * med[name]['step']:>18.3f}{med[name]['total']:>12.3f}")
    print(
        f"Trainer/bare: step {med['trainer']['step'] / med['bare']['step']:.3f}, "
        f"total {med['trainer']['total'] / med['bare']['total']:.3f} (target <= 1.01)"
    )


if __name__ == "__main__":
    main()
