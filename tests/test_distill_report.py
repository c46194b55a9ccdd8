"""Distillation end to end at toy size, EMT standing in for the teacher: sample + label with Hessian rows,
train a tiny SchNet with the Hessian loss (switching on mid-run), and report against the teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from mlff_distiller.data import keys
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.distill_report import distillation_report, nve_stability, print_report, speed_structures
from mlff_distiller.losses.hessian import EnergyForceHessianLoss
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.sampling import SamplingConfig, build_distillation_dataset, seed_structures
from mlff_distiller.training import Trainer, TrainingConfig

CUTOFF = 4.0


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(data module, trained student, trainer, loss) on a 8-atom Cu-Au set labelled by EMT with 2 rows each."""
    config = SamplingConfig(
        system="CuAu",
        teacher="emt",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        system_options={"min_atoms": 8, "num_seeds": 2},
        num_rattle=16,
        temperatures=[300.0, 900.0],
        snapshots_per_run=4,
        equilibration_steps=10,
        snapshot_interval=5,
        hessian_rows=2,
        progress=False,
    )
    path = build_distillation_dataset(config)
    data = AtomsDataModule(
        path=str(path), cutoff=CUTOFF, num_val=4, num_test=6, batch_size=4, val_batch_size=8, group_key="md_run"
    )
    torch.manual_seed(0)
    model = SchNet(cutoff=CUTOFF, hidden=16, interactions=1, num_rbf=8, statistics=data.statistics)
    loss = EnergyForceHessianLoss(energy_weight=1.0, force_weight=10.0, hessian_weight=0.1, hessian_start_step=4)
    config = TrainingConfig(
        max_epochs=2, batch_size=4, learning_rate=2e-3, lr_scheduler="none", checkpoint_dir=None, log_interval=100
    )
    trainer = Trainer(model, data.train_loader(), data.val_loader(), config=config, loss_fn=loss, device="cpu")
    trainer.fit()
    return data, model, trainer, loss


def test_labelled_set_has_rows_and_provenance(distilled):
    data, *_ = distilled
    batch = next(iter(data.train_loader()))
    assert set(keys.HESSIAN_KEYS) <= set(batch)
    assert batch[keys.HESSIAN_ROW_COORD].shape == (2 * len(batch),)
    assert batch[keys.HESSIAN_ROWS].shape == (2 * len(batch) * 3 * 8,)
    kinds = {t.split("_")[0] for split in data.datasets.values() for t in split.config_types}
    assert kinds == {"seed", "rattle", "md"}


def test_hessian_term_switches_on_at_its_step_in_training(distilled):
    data, _, trainer, loss = distilled
    steps_per_epoch = math.ceil(len(data.datasets["train"]) / 4)
    assert trainer.global_step == 2 * steps_per_epoch > loss.hessian_start_step
    assert loss.step == trainer.global_step and loss.hessian_active
    assert loss.calls == 2 * steps_per_epoch - loss.hessian_start_step  # rows drawn only once on
    history = trainer.history
    assert all(v > 0 for v in history["val/hessian_mae"])  # validated in both epochs
    assert history["train/hessian_mae"][1] > 0
    assert trainer.state_dict()["callbacks"]["loss_fn"] == {"calls": loss.calls}


def test_report_measures_accuracy_speed_and_md(distilled, tmp_path, capsys):
    data, model, _, _ = distilled
    from mlff_distiller.data.dataset import read_labelled_structures

    structures = read_labelled_structures(data.path)
    test = [structures[i] for i in data.split_indices["test"]]
    metrics = distillation_report(model, EMT(), test, tmp_path, speed_seconds=0.05, md_time_ps=0.1, md_timestep_fs=2.0)
    assert metrics["test/num_structures"] == len(test) >= 6
    for name in ("energy_mae_per_atom", "force_mae", "force_rmse", "hessian_mae"):
        assert 0 < metrics[f"test/{name}"] < 1e5
    assert metrics["test/force_rmse"] >= metrics["test/force_mae"]
    assert metrics["speed/32/num_atoms"] == 32 and metrics["speed/256/num_atoms"] == 256
    for size in (32, 256):
        assert metrics[f"speed/{size}/speedup"] == pytest.approx(
            metrics[f"speed/{size}/student_per_s"] / metrics[f"speed/{size}/teacher_per_s"]
        )
    assert metrics["md/time_ps"] == pytest.approx(0.1) and metrics["md/num_atoms"] == 32
    assert metrics["md/min_distance_bound"] > 1.0 and metrics["md/stable"] in (0.0, 1.0)
    assert math.isfinite(metrics["md/energy_drift"])
    assert json.loads((tmp_path / "distill_report.json").read_text()) == pytest.approx(metrics)
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_report(metrics)
    assert "meV/Å²" in capsys.readouterr().out


def test_nve_flags_atoms_that_come_too_close():
    (cu,) = seed_structures("Cu", min_atoms=4)
    calm = nve_stability(EMT(), cu, time_ps=0.02, temperature_K=300, min_distance_bound=2.0)
    assert calm["stable"] == 1.0 and calm["min_distance"] > 2.3
    assert abs(calm["energy_drift"]) < 5.0  # meV/atom/ps; EMT is smooth
    squeezed = nve_stability(EMT(), cu, time_ps=0.02, temperature_K=300, min_distance_bound=2.6)
    assert squeezed["stable"] == 0.0 and squeezed["time_ps"] == 0.0  # the fcc cell has 2.55 Å neighbours


def test_speed_structures_are_supercells_or_the_molecule():
    (cu,) = seed_structures("Cu", min_atoms=4)
    assert [len(a) for a in speed_structures(cu)] == [32, 256]
    (water,) = seed_structures("H2O")
    assert [len(a) for a in speed_structures(water)] == [3]
    assert np.allclose(speed_structures(water)[0].positions, water.positions)


def test_parity_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    import sys

    from mlff_distiller.distill_report import parity_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    parity = {f"{q}_{who}": np.zeros(3) for q in ("energy_per_atom", "forces") for who in ("teacher", "student")}
    with caplog.at_level("WARNING"):
        assert parity_plot(parity, tmp_path / "parity.png") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "parity.png").exists()
