"""Train a tiny force field with the Python API: energy and forces of Morse clusters, EMA weights,
cosine schedule, checkpoints, then reload the best checkpoint and check its forces.

Run: python examples/train_example.py            (a few seconds on a laptop CPU)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mlff_distiller.data.synthetic import MorseClusterData
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.pair import PairPotential
from mlff_distiller.training import TensorBoardLogger, Trainer, TrainingConfig, load_model_weights


def main(run_dir: Path) -> dict[str, list[float]]:
    torch.manual_seed(0)
    data = MorseClusterData(num_train=512, num_val=64, batch_size=32)
    config = TrainingConfig(
        max_epochs=30,
        batch_size=32,
        learning_rate=5e-3,
        optimizer="adam",
        lr_scheduler="cosine",
        checkpoint_dir=str(run_dir / "checkpoints"),
        log_interval=10,
        val_interval=1,
        ema_decay=0.99,
        grad_clip=10.0,
        monitor="val/force_mae",
    )
    trainer = Trainer(
        model=PairPotential(hidden=32),
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=config,
        device="cpu",
        loss_fn=EnergyForceLoss(energy_weight=1.0, force_weight=10.0),
        loggers=None,
    )
    trainer.loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    history = trainer.fit()

    # Reload the best (EMA) weights into a fresh model and check its forces on validation data.
    model = load_model_weights(PairPotential(hidden=32), run_dir / "checkpoints" / "best_model.pt").eval()
    batch = next(iter(data.val_loader()))
    force_mae = (model(batch)["forces"] - batch["forces"]).abs().mean().item()
    print(
        f"val/force_mae: first epoch {history['val/force_mae'][0]:.4f}, best {trainer.best_metric:.4f} eV/Å "
        f"(epoch {trainer.best_epoch}); reloaded best model on one batch: {force_mae:.4f} eV/Å"
    )
    print(f"checkpoints and TensorBoard events in {run_dir}")
    return history


if __name__ == "__main__":
    main(Path(tempfile.mkdtemp(prefix="mlff_example_")))
