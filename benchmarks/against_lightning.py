"""Against Lightning: the same task (SchNet 64x3 with stress on the default Cu-Au set, loss 10/30/1,
Adam, cosine schedule, gradient clipping 10, validation with forces and a checkpoint every epoch)
trained by our `Trainer` and by a `LightningModule` in `pytorch_lightning.Trainer`, each with its
default logging (ours: console + TensorBoard; Lightning: progress bar + its default logger).
EMA is off on both sides (Lightning has none built in).

Each run is a fresh process, so the time to the first optimizer step counts imports, data loading
(from the dataset cache) and set-up; runs alternate between the sides.

    python benchmarks/against_lightning.py [--repeats 3] [--epochs 2] [--num-train 192] [--threads 1]

Prints median step time, time to the first step and total time per side, and ours/Lightning ratios.
Lightning is not a dependency: without `pytorch_lightning` (or `lightning`) installed the script
says so and exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def lightning_module_name() -> str | None:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:  # "lightning" itself absent
            continue
    return None


def run_ours(args) -> tuple[list[float], float]:
    import torch
    from _task import GRAD_CLIP, LEARNING_RATE, data_module, loss_function, student

    from mlff_distiller.training import Callback, ConsoleLogger, TensorBoardLogger, Trainer, TrainingConfig

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_optimizer_step(self, trainer) -> None:
            self.times.append(time.time())

    torch.set_num_threads(args.threads)
    data = data_module(num_train=args.num_train)
    model = student("schnet", data)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=TrainingConfig(
            max_epochs=args.epochs,
            batch_size=data.batch_size,
            learning_rate=LEARNING_RATE,
            grad_clip=GRAD_CLIP,
            checkpoint_dir=str(Path(args.run_dir) / "checkpoints"),
            monitor="val/force_mae",
            device="cpu",
        ),
        loss_fn=loss_function(),
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=1e-5),
        callbacks=[timer],
        loggers=[ConsoleLogger(print_epochs=False), TensorBoardLogger(Path(args.run_dir) / "tensorboard")],
    )
    start = time.time()
    trainer.fit()
    return timer.times, time.time() - start


def run_lightning(args) -> tuple[list[float], float]:
    import importlib

    import torch
    from _task import GRAD_CLIP, LEARNING_RATE, data_module, loss_function, student

    pl = importlib.import_module(lightning_module_name() or "pytorch_lightning")

    class EnergyForceModule(pl.LightningModule):
        def __init__(self, model: torch.nn.Module, epochs: int) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = loss_function()
            self.epochs = epochs

        def training_step(self, batch, batch_index):
            terms = self.loss_fn(self.model, batch)
            self.log("train/loss", terms["loss"], batch_size=len(batch))
            return terms["loss"]

        def validation_step(self, batch, batch_index):
            terms = self.loss_fn(self.model, batch)
            force_mae = terms["force_mae"]  # an exact (total, count) pair; Lightning averages per batch
            self.log("val/force_mae", force_mae.total / force_mae.count, batch_size=len(batch))

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs, eta_min=1e-5)
            return {"optimizer": optimizer, "lr_scheduler": cosine}

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
            self.times.append(time.time())

    torch.set_num_threads(args.threads)
    data = data_module(num_train=args.num_train)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=GRAD_CLIP,
        inference_mode=False,  # validation differentiates the energy for forces
        num_sanity_val_steps=0,  # ours has no sanity pass either
        default_root_dir=args.run_dir,
        callbacks=[timer],
        enable_model_summary=False,
    )
    start = time.time()
    trainer.fit(EnergyForceModule(student("schnet", data), args.epochs), data.train_loader(), data.val_loader())
    return timer.times, time.time() - start


def child(args) -> None:
    times, total = (run_ours if args.side == "ours" else run_lightning)(args)
    steps = [b - a for a, b in zip(times[:-1], times[1:])]
    print(json.dumps({"first_step": times[0] - args.launch, "step": statistics.median(steps), "total": total}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", choices=["ours", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--launch", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    name = lightning_module_name()
    if name is None:
        print("Lightning is not installed (pip install pytorch-lightning): nothing to compare; skipped.")
        return
    version = importlib.import_module(name).__version__
    results: dict[str, dict[str, list[float]]] = {side: {} for side in ("ours", "lightning")}
    options = ["--epochs", str(args.epochs), "--num-train", str(args.num_train), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # round 0 warms the file cache
            for side in ("ours", "lightning") if repeat % 2 else ("lightning", "ours"):
                run_dir = Path(tmp) / f"{side}-{repeat}"
                launch = time.time()
                out = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--launch", repr(launch), "--run-dir", str(run_dir)]
                    + options,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                if repeat:
                    for key, value in json.loads(out.strip().splitlines()[-1]).items():
                        results[side].setdefault(key, []).append(value)
    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in results.items()}
    print(
        f"SchNet 64x3 + stress, {args.num_train} train structures, batch 32, {args.epochs} epochs, "
        f"{args.threads} thread(s); {name} {version}; {args.repeats} alternating runs (fresh processes), medians"
    )
    print(f"{'trainer':<12}{'median step (ms)':>18}{'first step (s)':>16}{'fit (s)':>10}")
    for side in ("ours", "lightning"):
        m = med[side]
        print(f"{side:<12}{1e3 * m['step']:>18.1f}{m['first_step']:>16.2f}{m['total']:>10.2f}")
    ratios = {k: med["ours"][k] / med["lightning"][k] for k in ("step", "first_step", "total")}
    met = ratios["step"] < 1 and ratios["first_step"] < 1
    print(
        f"ours/Lightning: step {ratios['step']:.3f}, first step {ratios['first_step']:.3f}, fit {ratios['total']:.3f} "
        f"(target: < 1 per step and to the first step: {'met' if met else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
