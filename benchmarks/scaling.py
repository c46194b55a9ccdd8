"""Scaling of the default job (SchNet 64x3 with stress, batch 32, Adam + cosine, EMA, validation and
checkpoint every epoch, via `Trainer`) with training-set size (1x, 4x) and threads (1, 2).

    python benchmarks/scaling.py [--base 96] [--repeats 3] [--epochs 2]

Each configuration trains ``--epochs`` epochs; the last epoch's training time (validation on a
fixed 50 structures excluded) is recorded. Configurations alternate within each repeat. Prints the
time per epoch, the 4x/1x ratio (linear in data: 4.0) and the 2-thread speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _task import EMA_DECAY, GRAD_CLIP, LEARNING_RATE, data_module, loss_function, student


def epoch_times(num_train: int, threads: int, epochs: int, run_dir: Path) -> tuple[float, float]:
    """(training time, whole epoch time) of the last epoch, seconds."""
    from mlff_distiller.training import ConsoleLogger, Trainer, TrainingConfig

    torch.set_num_threads(threads)
    data = data_module(num_train=num_train, num_val=50)
    model = student("schnet", data)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    trainer = Trainer(
        model=model,
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=TrainingConfig(
            max_epochs=epochs,
            batch_size=data.batch_size,
            learning_rate=LEARNING_RATE,
            grad_clip=GRAD_CLIP,
            ema_decay=EMA_DECAY,
            checkpoint_dir=str(run_dir),
            monitor="val/force_mae",
            device="cpu",
        ),
        loss_fn=loss_function(),
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5),
        loggers=[ConsoleLogger(print_epochs=False)],
    )
    history = trainer.fit()
    train_time = len(data.datasets["train"]) / history["train/samples_per_s"][-1]
    return train_time, history["epoch_time_s"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=96, help="training structures at 1x (4x: four times as many)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    configs = [(scale, threads) for threads in (1, 2) for scale in (1, 4)]
    results: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for k, (scale, threads) in enumerate(configs if repeat % 2 == 0 else reversed(configs)):
                run_dir = Path(tmp) / f"{repeat}-{k}"
                results[(scale, threads)].append(epoch_times(scale * args.base, threads, args.epochs, run_dir))
    med = {c: tuple(statistics.median(v) for v in zip(*r)) for c, r in results.items()}
    print(
        f"Default job (SchNet 64x3 + stress, batch 32, EMA, val 50 structures + checkpoint each epoch); "
        f"{args.repeats} alternating runs, medians of the last of {args.epochs} epochs"
    )
    print(f"{'train structures':>17}{'threads':>9}{'train (s/epoch)':>17}{'epoch (s)':>11}{'ms/structure':>14}")
    for scale, threads in configs:
        train, epoch = med[(scale, threads)]
        per_structure = 1e3 * train / (scale * args.base)
        print(f"{scale * args.base:>17}{threads:>9}{train:>17.2f}{epoch:>11.2f}{per_structure:>14.2f}")
    for threads in (1, 2):
        ratio = med[(4, threads)][0] / med[(1, threads)][0]
        print(f"{threads} thread(s): 4x data / 1x data, training time per epoch = {ratio:.2f} (linear: 4.00)")
    for scale in (1, 4):
        print(f"{scale}x data: 1 thread / 2 threads = {med[(scale, 1)][0] / med[(scale, 2)][0]:.2f}x speed-up")


if __name__ == "__main__":
    main()
