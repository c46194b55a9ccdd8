"""Trainer overhead: the same training run by a minimal hand-written loop and by `Trainer`, side by side, runs
alternating in one process.

Two tasks (``--task``):

- ``default``: the default job's student (SchNet 64x3 with stress), data (default Cu-Au EMT set, batch 32) and
  loss (energy/force/stress 10/30/1); a step takes ~200 ms on one thread, which hides per-step costs.
- ``light``: the same SchNet 64x3 without stress on EMT-labelled small molecules (6-14 atoms, batch 32, loss
  energy/force 10/30); a step takes ~20 ms on one thread (on a GPU a default step is ~10 ms), so whatever the
  Trainer does per step beyond the bare loop's work shows.

Both sides do the same work: Adam, gradient clipping, EMA 0.99 updated every step, the exact training
metrics (the loss's (total, count) terms, added up over the epoch in float64), then every epoch validation with
the EMA weights (forces by autograd), a cosine scheduler step and a checkpoint (model, optimizer, scheduler,
EMA). The Trainer adds what the default job has on top: TensorBoard and console logging, a best-model
checkpoint, previous.pt, atomic fsync'ed writes, the non-finite guard, the preemption and time-budget check,
metric history. Both run with the host allocator setting the Trainer makes in ``fit()`` (glibc keeps freed
memory, the Trainer's default; ``--default-malloc`` turns it off): it is process-wide, so it is made once before the
first run; ``--default-malloc`` measures both with the allocator's default behaviour.

    python benchmarks/trainer_overhead.py [--task default|light] [--repeats 5] [--epochs 2] [--threads 1]
        [--clock wall|cpu] [--default-malloc] [--device cpu|cuda]

On a GPU (``--device cuda``) the bare loop never waits for the device inside an epoch, while the Trainer waits
once per step (its non-finite check reads a flag): the ratios include that wait. Both totals include all queued
work (each epoch's checkpoint waits for it).

Prints the median optimizer-step time and total time per side and the Trainer/bare ratios of those medians,
then each round's ratios with their median (the paired estimate: a round's two runs share the load of the
moment) and spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _task import (
    EMA_DECAY,
    GRAD_CLIP,
    LEARNING_RATE,
    data_module,
    light_data_module,
    light_loss_function,
    light_student,
    loss_function,
    student,
)

from mlff_distiller.memory import keep_freed_memory

clock = time.perf_counter
"""What both sides time with; ``--clock cpu`` makes it this thread's CPU time, which other processes on a shared
machine disturb far less than wall time (but which leaves out waiting on the disk: the Trainer's fsyncs)."""
keep_memory = True
device = torch.device("cpu")
"""Where both sides train (``--device``): the Trainer moves each batch there itself, the bare loop in its loop."""


@dataclass
class Task:
    """What both loops train: data module, a student factory, a loss factory, and a line that describes it."""

    data: Any
    make_student: Callable[[Any], torch.nn.Module]
    make_loss: Callable[[], Any]
    description: str


def build_task(name: str, num_train: int | None, directory: Path) -> Task:
    if name == "light":
        data = light_data_module(directory, num_train=num_train or 960)
        what = "SchNet 64x3 (no stress) on small molecules (6-14 atoms)"
        return Task(data, light_student, light_loss_function, what)
    data = data_module(num_train=num_train or 192)
    return Task(data, lambda d: student("schnet", d), loss_function, "SchNet 64x3 + stress on 32-atom Cu-Au cells")


def exact_means(epoch_terms: list[dict[str, Any]], weights: list[int]) -> dict[str, float]:
    """The epoch's training metrics from each step's detached terms: sums of totals over sums of counts in
    float64 (a plain tensor term is a per-sample mean, weighted by the batch's samples)."""
    from mlff_distiller.training.metrics import Mean

    out: dict[str, float] = {}
    for name, first in epoch_terms[0].items():
        if isinstance(first, Mean):
            total = torch.stack([t[name].total.double() for t in epoch_terms]).sum()
            count = torch.stack([torch.as_tensor(t[name].count).double() for t in epoch_terms]).sum()
        else:
            total = torch.stack([t[name].double() * w for t, w in zip(epoch_terms, weights)]).sum()
            count = torch.tensor(float(sum(weights)), dtype=torch.float64)
        out[name] = float(total / count)
    return out


def bare_loop(task: Task, epochs: int, run_dir: Path) -> tuple[list[float], float]:
    """The hand-written loop: the same work as the Trainer, written as plainly as possible."""
    model, loss_fn = task.make_student(task.data).to(device), task.make_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    train_loader, val_loader = task.data.train_loader(), task.data.val_loader()
    steps: list[float] = []
    updates = 0
    start = clock()
    for epoch in range(epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)  # the Trainer's order: a function of (seed, epoch)
        epoch_terms, weights = [], []
        last = clock()
        for batch in train_loader:
            batch = batch.to(device)
            terms = loss_fn(model, batch)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(EMA_DECAY, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            updates += 1
            epoch_terms.append({**terms, "loss": terms["loss"].detach()})
            weights.append(len(batch))
            now = clock()
            steps.append(now - last)
            last = now
        train = exact_means(epoch_terms, weights)
        model.eval()
        backup = [p.detach().clone() for p in params]
        torch._foreach_copy_([p.data for p in params], ema)
        for p in params:
            p.requires_grad_(False)
        maes = [loss_fn(model, batch.to(device))["force_mae"] for batch in val_loader]  # (total, count) pairs
        val = sum(m.total for m in maes) / sum(m.count for m in maes)
        for p in params:
            p.requires_grad_(True)
        torch._foreach_copy_([p.data for p in params], backup)
        scheduler.step()
        state = {
            "train": train,
            "val_force_mae": float(val),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema,
        }
        torch.save(state, run_dir / "last.pt")
    return steps, clock() - start


def with_trainer(task: Task, epochs: int, run_dir: Path) -> tuple[list[float], float]:
    from mlff_distiller.training import Callback, ConsoleLogger, TensorBoardLogger, Trainer, TrainingConfig

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.last = 0.0

        def on_train_epoch_start(self, trainer) -> None:
            self.last = clock()

        def on_optimizer_step(self, trainer) -> None:
            now = clock()
            self.steps.append(now - self.last)
            self.last = now

    model, loss_fn = task.make_student(task.data), task.make_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    timer = StepTimer()
    config = TrainingConfig(
        max_epochs=epochs,
        batch_size=task.data.batch_size,
        learning_rate=LEARNING_RATE,
        grad_clip=GRAD_CLIP,
        checkpoint_dir=str(run_dir / "checkpoints"),
        log_interval=10,
        monitor="val/force_mae",
        ema_decay=EMA_DECAY,
        keep_freed_memory=keep_memory,
        device=str(device),
    )
    trainer = Trainer(
        model=model,
        train_loader=task.data.train_loader(),
        val_loader=task.data.val_loader(),
        config=config,
        loss_fn=loss_fn,
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5),
        callbacks=[timer],
        loggers=[ConsoleLogger(print_epochs=False), TensorBoardLogger(run_dir / "tensorboard")],
    )
    start = clock()
    trainer.fit()
    return timer.steps, clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("default", "light"), default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--num-train", type=int, default=None, help="training structures (default task: 192, light task: 960)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's allocator as it comes (no keep_freed_memory)"
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock, keep_memory, device
    device = torch.device(args.device)
    keep_memory = not args.default_malloc
    if keep_memory:
        keep_freed_memory()  # what the Trainer's fit() does, for both sides from the start
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    sides = {"bare": bare_loop, "Trainer": with_trainer}
    results: dict[str, dict[str, list[float]]] = {name: {"step": [], "total": []} for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        task = build_task(args.task, args.num_train, Path(tmp))
        for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator, tensorboard)
            for name, run in sides.items() if repeat % 2 else reversed(sides.items()):
                run_dir = Path(tmp) / f"{name}-{repeat}"
                run_dir.mkdir()
                steps, total = run(task, args.epochs if repeat else 1, run_dir)
                if repeat:
                    results[name]["step"].append(statistics.median(steps))
                    results[name]["total"].append(total)
    data = task.data
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print(
        f"{task.description}: {len(data.datasets['train'])} train / {len(data.datasets['val'])} val structures, "
        f"batch {data.batch_size}, {args.epochs} epochs, EMA, checkpoint + validation every epoch; {device}, "
        f"{args.threads} thread(s), {args.repeats} alternating runs, medians, {args.clock} clock, malloc "
        f"{'as it comes' if args.default_malloc else 'keeping freed memory'}"
    )
    print(f"{'loop':<10}{'median step (ms)':>18}{'total (s)':>12}")
    for name in sides:
        print(f"{name:<10}{1e3 * med[name]['step']:>18.2f}{med[name]['total']:>12.2f}")
    ratios = {
        kind: [t / b for t, b in zip(results["Trainer"][kind], results["bare"][kind])] for kind in ("step", "total")
    }
    step_ratio = med["Trainer"]["step"] / med["bare"]["step"]
    total_ratio = med["Trainer"]["total"] / med["bare"]["total"]
    print(
        f"Trainer/bare: step {step_ratio:.3f}, total {total_ratio:.3f} (target <= 1.01: "
        f"{'met' if max(step_ratio, total_ratio) <= 1.01 else 'NOT met'})"
    )
    for kind, values in ratios.items():
        # A round's two runs share the machine's load of the moment, so their ratio is the paired estimate.
        print(
            f"  per-round {kind} ratios (median {statistics.median(values):.3f}, min {min(values):.3f}, "
            f"max {max(values):.3f}): " + " ".join(f"{r:.3f}" for r in values)
        )


if __name__ == "__main__":
    main()
