"""Trainer overhead: the default job's student (SchNet 64x3 with stress), data (default Cu-Au EMT set),
loss (energy/force/stress 10/30/1), Adam, cosine schedule, gradient clipping and EMA 0.99, trained
by a minimal hand-written loop and by `Trainer`, side by side, runs alternating.

Both sides do the same work every epoch: train (clip, step, EMA update), validate with the EMA
weights (forces by autograd), step the scheduler and save a checkpoint (model, optimizer,
scheduler, EMA). The Trainer adds what the default job has on top: TensorBoard and console
logging, a best-model checkpoint, the non-finite guard, metric history.

    python benchmarks/trainer_overhead.py [--repeats 5] [--epochs 2] [--num-train 192] [--threads 1]

Prints the median optimizer-step time and total time per side and the Trainer/bare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _task import EMA_DECAY, GRAD_CLIP, LEARNING_RATE, data_module, loss_function, student


def bare_loop(data, epochs: int, run_dir: Path) -> tuple[list[float], float]:
    """The hand-written loop: the same work as the Trainer, written as plainly as possible."""
    model, loss_fn = student("schnet", data), loss_function()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    train_loader, val_loader = data.train_loader(), data.val_loader()
    steps: list[float] = []
    updates = 0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        last = time.perf_counter()
        for batch in train_loader:
            loss = loss_fn(model, batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(EMA_DECAY, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            updates += 1
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        model.eval()
        backup = [p.detach().clone() for p in params]
        torch._foreach_copy_([p.data for p in params], ema)
        for p in params:
            p.requires_grad_(False)
        maes = [loss_fn(model, batch)["force_mae"] for batch in val_loader]  # (total, count) pairs
        val = sum(m.total for m in maes) / sum(m.count for m in maes)
        for p in params:
            p.requires_grad_(True)
        torch._foreach_copy_([p.data for p in params], backup)
        scheduler.step()
        state = {
            "val_force_mae": float(val),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema,
        }
        torch.save(state, run_dir / "last.pt")
    return steps, time.perf_counter() - start


def with_trainer(data, epochs: int, run_dir: Path) -> tuple[list[float], float]:
    from mlff_distiller.training import Callback, ConsoleLogger, TensorBoardLogger, Trainer, TrainingConfig

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.last = 0.0

        def on_train_epoch_start(self, trainer) -> None:
            self.last = time.perf_counter()

        def on_optimizer_step(self, trainer) -> None:
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now

    model, loss_fn = student("schnet", data), loss_function()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    timer = StepTimer()
    config = TrainingConfig(
        max_epochs=epochs,
        batch_size=data.batch_size,
        learning_rate=LEARNING_RATE,
        grad_clip=GRAD_CLIP,
        checkpoint_dir=str(run_dir / "checkpoints"),
        log_interval=10,
        monitor="val/force_mae",
        ema_decay=EMA_DECAY,
        device="cpu",
    )
    trainer = Trainer(
        model=model,
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=config,
        loss_fn=loss_fn,
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5),
        callbacks=[timer],
        loggers=[ConsoleLogger(print_epochs=False), TensorBoardLogger(run_dir / "tensorboard")],
    )
    start = time.perf_counter()
    trainer.fit()
    return timer.steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=192, help="training structures (the default job: 800)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = data_module(num_train=args.num_train)
    sides = {"bare": bare_loop, "Trainer": with_trainer}
    results: dict[str, dict[str, list[float]]] = {name: {"step": [], "total": []} for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator, tensorboard)
            for name, run in sides.items() if repeat % 2 else reversed(sides.items()):
                run_dir = Path(tmp) / f"{name}-{repeat}"
                run_dir.mkdir()
                steps, total = run(data, args.epochs if repeat else 1, run_dir)
                if repeat:
                    results[name]["step"].append(statistics.median(steps))
                    results[name]["total"].append(total)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print(
        f"SchNet 64x3 + stress, {args.num_train} train / {len(data.datasets['val'])} val structures, batch "
        f"{data.batch_size}, {args.epochs} epochs, EMA, checkpoint + validation every epoch; {args.threads} "
        f"thread(s), {args.repeats} alternating runs, medians"
    )
    print(f"{'loop':<10}{'median step (ms)':>18}{'total (s)':>12}")
    for name in sides:
        print(f"{name:<10}{1e3 * med[name]['step']:>18.1f}{med[name]['total']:>12.2f}")
    step_ratio = med["Trainer"]["step"] / med["bare"]["step"]
    total_ratio = med["Trainer"]["total"] / med["bare"]["total"]
    print(
        f"Trainer/bare: step {step_ratio:.3f}, total {total_ratio:.3f} (target <= 1.01: "
        f"{'met' if max(step_ratio, total_ratio) <= 1.01 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
