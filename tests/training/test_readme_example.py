"""The README's Python-API snippet runs as written (checkpoint_dir moved under tmp_path)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from mlff_distiller.training import Trainer, TrainingConfig


def test_readme_snippet_trains_and_restores_best_checkpoint(tmp_path):
    """config -> Trainer -> fit() -> load_checkpoint(best_model.pt) on TensorDataset loaders: 100 epochs run,
    the val loss falls below 0.35x, the cosine lr ends near 0, and loading best_model.pt restores the best epoch's
    weights, epoch and metric."""
    torch.manual_seed(0)
    ckpt = f"{tmp_path}/checkpoints/"
    # fmt: off
    # --- README, verbatim except checkpoint_dir ---
    x = torch.randn(512, 8)
    y = x.sin().sum(dim=1, keepdim=True)
    train_loader = DataLoader(TensorDataset(x[:448], y[:448]), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(x[448:], y[448:]), batch_size=32)
    student_model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))

    config = TrainingConfig(max_epochs=100, batch_size=32, learning_rate=1e-3, optimizer="adam",
                            lr_scheduler="cosine", checkpoint_dir=ckpt, log_interval=10,
                            val_interval=1)
    trainer = Trainer(model=student_model, train_loader=train_loader, val_loader=val_loader,
                      config=config, device="cpu")   # "cuda", or "auto": CUDA when present
    history = trainer.fit()          # {"train/loss": [...], "val/loss": [...], "lr": [...], "epoch_time_s": [...], ...}
    trainer.load_checkpoint(f"{ckpt}best_model.pt")
    # --- end of README ---
    # fmt: on

    assert len(history["epoch"]) == 100
    assert history["val/loss"][-1] < 0.35 * history["val/loss"][0]
    assert math.isclose(history["lr"][-1], 1e-3 * (1 + math.cos(math.pi * 99 / 100)) / 2, rel_tol=1e-6)
    best_epoch = min(range(100), key=lambda i: history["val/loss"][i]) + 1
    assert trainer.epoch == trainer.best_epoch == best_epoch
    assert trainer.best_metric == min(history["val/loss"])
    best = torch.load(f"{ckpt}best_model.pt", weights_only=True)
    for name, tensor in student_model.state_dict().items():
        assert torch.equal(tensor, best["model"][name])
