"""Distillation end to end at toy size, EMT standing in for the teacher: sample + label with Hessian rows,
train a tiny SchNet with the Hessian loss (switching on mid-run), and report against the teacher: sampled
split, fresh frames of the student's own MD (teacher-labelled), speed, the stability gate and the verdict."""

from __future__ import annotations

import json
import math

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from mlff_distiller.calculator import StudentCalculator
from mlff_distiller.data import keys
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.distill.gate import GateConfig, combine_trajectories, gate_cell, stability_gate
from mlff_distiller.distill.report import (
    ReportConfig,
    _beside,
    _gate_job,
    _spawn_context,
    distillation_report,
    print_report,
    speed_structures,
)
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


def test_report_measures_accuracy_fresh_frames_speed_gate_and_gives_a_verdict(distilled, tmp_path, capsys):
    data, model, _, _ = distilled
    from mlff_distiller.data.dataset import read_labelled_structures

    structures = read_labelled_structures(data.path)
    test = [structures[i] for i in data.split_indices["test"]]
    seeds = seed_structures("CuAu", min_atoms=8, num_seeds=2)
    gate = GateConfig(nvt_ps=0.1, nve_ps=0.1, min_atoms=32, record_every=5)
    config = ReportConfig(
        speed_seconds=0.05, fresh_frames=3, fresh_interval=5, fresh_equilibration_steps=10, gate=gate, observables=None
    )
    metrics = distillation_report(model, EMT(), test, tmp_path, seeds, [300.0, 600.0], config)
    assert metrics["test/num_structures"] == len(test) >= 6
    for name in ("energy_mae_per_atom", "force_mae", "force_rmse", "hessian_mae", "force_std"):
        assert 0 < metrics[f"test/{name}"] < 1e5
    assert metrics["test/force_rmse"] >= metrics["test/force_mae"]
    assert metrics["test/force_mae_rel"] == pytest.approx(metrics["test/force_mae"] / metrics["test/force_std"])
    # Fresh frames: 3 per target temperature from the student's own MD, labelled by the teacher, never trained on.
    fresh = ase.io.read(tmp_path / "fresh_frames.extxyz", ":")
    assert metrics["fresh/num_structures"] == metrics["fresh/teacher_calls"] == len(fresh) == 6
    assert sorted({a.info["temperature_K"] for a in fresh}) == [300.0, 600.0]
    assert all(a.info["provenance"].startswith("fresh:driver=final_student") for a in fresh)
    for atoms in fresh:  # the stored labels are the teacher's
        check = atoms.copy()
        check.calc = EMT()
        np.testing.assert_allclose(atoms.get_forces(), check.get_forces(), atol=1e-6)
    assert 0 < metrics["fresh/force_mae"] and metrics["fresh/force_mae_rel"] > 0
    # Speed, side by side.
    assert metrics["speed/32/num_atoms"] == 32 and metrics["speed/256/num_atoms"] == 256
    for size in (32, 256):
        assert metrics[f"speed/{size}/speedup"] == pytest.approx(
            metrics[f"speed/{size}/student_per_s"] / metrics[f"speed/{size}/teacher_per_s"]
        )
    # The gate ran at 1.5 x 600 K in 32 atoms; the verdict follows the gate and the fresh-frame bound.
    assert metrics["gate/temperature_K"] == 900.0 and metrics["gate/num_atoms"] == 32
    assert metrics["gate/min_distance_bound"] > 1.0 and metrics["gate/passed"] in (0.0, 1.0)
    failed = metrics["gate/passed"] == 0.0 or metrics["fresh/force_mae_rel"] > 0.05
    assert metrics["verdict"] == ("fail" if failed else "pass") and bool(metrics["reasons"]) == failed
    report = json.loads((tmp_path / "distill_report.json").read_text())
    assert report["verdict"] == metrics["verdict"] and report["reasons"] == metrics["reasons"]
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_report(metrics)
    out = capsys.readouterr().out
    assert "meV/Å²" in out and "verdict" in out


def test_the_gate_run_beside_in_a_second_process_is_the_gate_run_here(distilled):
    """``distill_report.parallel``: the gate in a spawned one-thread process while this one, on one thread, goes
    on; the same seed and one thread on each side give the same trajectory, so the same metrics."""
    _, model, _, _ = distilled
    seeds = seed_structures("CuAu", min_atoms=8, num_seeds=2)
    gate = GateConfig(nvt_ps=0.06, nve_ps=0.06, min_atoms=32, record_every=5)
    cell = gate_cell(seeds[0], gate)
    task = (model, cell, [600.0], gate, 1.5, {"Cu-Cu": 1.6}, 0, torch.float32, [0], None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = _gate_job(task)
    finally:
        torch.set_num_threads(threads)
    with _beside(_gate_job, task, parallel=True) as beside:
        assert torch.get_num_threads() == 1  # this process leaves the other core to the gate meanwhile
    assert torch.get_num_threads() == threads
    there = beside()
    ((here_outcome,), _), ((there_outcome,), _) = here, there
    timing = ("nvt/ns_per_day", "nve/ns_per_day")
    assert {k: v for k, v in there_outcome.metrics.items() if k not in timing} == {
        k: v for k, v in here_outcome.metrics.items() if k not in timing
    }
    assert there_outcome.reasons == here_outcome.reasons and here_outcome.metrics["nvt/time_ps"] == pytest.approx(0.06)


def test_trajectories_shared_between_two_processes_make_the_gate_run_in_one(distilled):
    """With ``trajectories`` > 1 the report's second process runs the even trajectories and this one the odd:
    the combined gate is the gate that ran them in turn, and a failure on one side stops the other."""
    _, model, _, _ = distilled
    seeds = seed_structures("CuAu", min_atoms=8, num_seeds=2)
    # The toy student heats up at 900 K: a wide temperature tolerance lets all three trajectories pass.
    gate = GateConfig(nvt_ps=0.04, nve_ps=0.0, min_atoms=32, record_every=5, trajectories=3, temperature_tolerance=5.0)
    cell = gate_cell(seeds[0], gate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calculator = StudentCalculator(model)
        in_turn, in_turn_reasons = stability_gate(calculator, seeds[0], [600.0], gate, 1.5, 0, {"Cu-Cu": 1.6})
        failed = _spawn_context().Event()

        def task(indices):
            return (model, cell, [600.0], gate, 1.5, {"Cu-Cu": 1.6}, 0, torch.float32, indices, failed)

        with _beside(_gate_job, task([0, 2]), parallel=True) as beside:
            odd, _ = _gate_job(task([1]))
        even, _ = beside()
    finally:
        torch.set_num_threads(threads)
    assert [o.index for o in even] == [0, 2] and [o.index for o in odd] == [1]
    shared, reasons, _ = combine_trajectories(even + odd, cell, [600.0], gate, 1.5, {"Cu-Cu": 1.6})
    assert in_turn["trajectories_passed"] == shared["trajectories_passed"] == 3.0 and reasons == in_turn_reasons == []
    timing = ("seconds",)
    assert {k: v for k, v in shared.items() if not k.endswith(("ns_per_day", *timing))} == {
        k: v for k, v in in_turn.items() if not k.endswith(("ns_per_day", *timing))
    }
    # Set by a failure elsewhere, the event stops a process before its next trajectory.
    failed.set()
    assert _gate_job(task([1])) == ([], None)
    # An error on one side sets it too, so the other does not run its trajectories to the end first.
    failed = _spawn_context().Event()
    with pytest.raises(TypeError, match="StudentPotential needs an atomistic student"):
        _gate_job((None, cell, [600.0], gate, 1.5, {}, 0, torch.float32, [1], failed))
    assert failed.is_set()


def _fails(task):
    raise ValueError(f"no gate for {task}")


def test_an_error_in_the_second_process_is_raised_here_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"_fails failed in its process:(.|\n)*ValueError: no gate for \(7,\)"):
        with _beside(_fails, (7,), parallel=True):
            pass
    with pytest.raises(ValueError, match="distill_report.gate.compile='fast' is not a compile mode"):
        GateConfig(compile="fast")


def test_speed_structures_are_supercells_or_the_molecule():
    (cu,) = seed_structures("Cu", min_atoms=4)
    assert [len(a) for a in speed_structures(cu)] == [32, 256]
    (water,) = seed_structures("H2O")
    assert [len(a) for a in speed_structures(water)] == [3]
    assert np.allclose(speed_structures(water)[0].positions, water.positions)


def test_parity_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    import sys

    from mlff_distiller.plots import parity_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    parity = {f"{q}_{who}": np.zeros(3) for q in ("energy_per_atom", "forces") for who in ("reference", "predicted")}
    with caplog.at_level("WARNING"):
        assert parity_plot(parity, tmp_path / "parity.png") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "parity.png").exists()
