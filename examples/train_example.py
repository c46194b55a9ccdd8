"""Train a SchNet student on EMT-labelled Cu-Au structures with the Python API, then run it as an
ASE calculator. Runs in well under a minute on a laptop CPU.

    python examples/train_example.py

The 300-structure dataset is generated and labelled once, then cached (~/.cache/mlff_distiller).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mlff_distiller.calculator import StudentCalculator
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.generate import build_default_dataset
from mlff_distiller.training import Trainer, TrainingConfig, load_model_weights


def main(run_dir: Path, max_epochs: int = 8) -> dict[str, list[float]]:
    torch.manual_seed(0)
    data = AtomsDataModule(
        path=str(build_default_dataset(num_structures=300, progress=False)),
        cutoff=5.0,
        num_val=30,
        num_test=30,
        batch_size=8,
    )
    config = TrainingConfig(
        max_epochs=max_epochs,
        batch_size=8,
        learning_rate=2e-3,
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
        model=SchNet(cutoff=5.0, hidden=32, interactions=2, statistics=data.statistics),
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=config,
        device="cpu",
        loss_fn=EnergyForceLoss(energy_weight=1.0, force_weight=10.0),
    )
    history = trainer.fit()

    # The best (EMA) weights in a fresh model, used through ASE like any other calculator.
    student = load_model_weights(
        SchNet(cutoff=5.0, hidden=32, interactions=2), run_dir / "checkpoints" / "best_model.pt"
    )
    calculator = StudentCalculator(student)
    from mlff_distiller.teachers.labelling import read_labelled

    atoms = read_labelled(data.path, index=data.split_indices["test"][0])
    reference = atoms.get_forces()
    atoms.calc = calculator
    error = abs(atoms.get_forces() - reference).mean() * 1e3
    print(
        f"val/force_mae: epoch 1 {history['val/force_mae'][0]:.0f} -> best {trainer.best_metric:.0f} meV/Å "
        f"(epoch {trainer.best_epoch}); one test structure through ASE: force MAE {error:.0f} meV/Å"
    )
    return history


if __name__ == "__main__":
    main(Path(tempfile.mkdtemp(prefix="mlff_example_")))
