"""`mlff-train experiment=distill_smoke`: the distillation path end to end (round 0, the active loop, the final
student, the report and its verdict) with EMT standing in for the foundation model; an undertrained student
fails its verdict with exit code 3 after writing everything."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest

from mlff_distiller.cli import EXIT_VERDICT_FAILED

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "mlff-train").exists(), reason="mlff-train is not installed")


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / "mlff-train"), "experiment=distill_smoke", "logger=none", "hydra.run.dir=run", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_distill_smoke_runs_end_to_end(tmp_path):
    result = run_cli(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("parity.png", "learning_curve.png"):
        assert (run / name).stat().st_size > 1000
    # Round 0, two active rounds within the budget, the final student, its report and a passing verdict.
    assert metrics["distill/loop/rounds"] == 2 and metrics["distill/teacher_calls/train"] <= 80
    assert metrics["distill/teacher_calls/train"] == metrics["distill/teacher_calls/round0"] + sum(
        metrics[f"distill/loop/round_{r}/teacher_calls"] for r in (1, 2)
    )
    assert metrics["distill/test/num_structures"] >= 4 and 0 < metrics["distill/test/force_mae"] < 5000
    assert metrics["distill/fresh/num_structures"] == 3 and metrics["distill/fresh/force_mae_rel"] < 0.5
    assert metrics["distill/speed/8/student_per_s"] > 0 and metrics["distill/speed/8/teacher_per_s"] > 0
    assert metrics["distill/gate/passed"] == 1.0 and metrics["distill/gate/nvt/time_ps"] == pytest.approx(0.3)
    # Copper alone: its one pair bound is the overall bound (both 0.6 x round 0's closest contact).
    assert metrics["distill/gate/min_distance_bound/Cu-Cu"] == pytest.approx(metrics["distill/gate/min_distance_bound"])
    assert metrics["distill/verdict"] == "pass" and metrics["distill/reasons"] == []
    for phase in ("round0_s", "rounds_s", "final_training_s", "report_s", "total_s"):
        assert metrics[f"distill/time/{phase}"] >= 0
    assert "Student vs teacher" in output and "verdict" in output
    # The final training set keeps each structure's provenance, the active rounds' included.
    (final,) = Path(os.environ["XDG_CACHE_HOME"]).glob("mlff_distiller/datasets/active_cu_emt_*/train_set_003.extxyz")
    structures = ase.io.read(final, ":")
    assert all("provenance" in atoms.info for atoms in structures)
    explored = [a for a in structures if a.info["provenance"].startswith("explore:")]
    assert len(explored) == metrics["distill/loop/round_1/selected"] + metrics["distill/loop/round_2/selected"]
    assert all({"round", "driver", "temperature_K", "score"} <= set(a.info) for a in explored)


def test_an_undertrained_student_fails_its_verdict_with_exit_code_3(tmp_path):
    result = run_cli(
        tmp_path, "distill.rounds=0", "trainer.max_epochs=1", "trainer.learning_rate=1e-6", "trainer.min_lr=0"
    )
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_VERDICT_FAILED == 3, output[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # written before the exit
    assert metrics["distill/verdict"] == "fail" and metrics["distill/loop/rounds"] == 0
    assert any(reason.startswith("fresh/force_mae_rel = ") for reason in metrics["distill/reasons"])
    assert json.loads((tmp_path / "run" / "distill_report.json").read_text())["verdict"] == "fail"
    assert "mlff-train: error: the distilled student failed its verdict" in result.stderr and "Try:" in result.stderr


def test_a_gate_failure_is_learned_from_in_a_refinement_pass(tmp_path):
    """A gate whose bound sits just under the crystal's contacts fails by instability; one refinement pass labels
    frames from before the failure (within the budget), adds them to the training split only, trains on and
    reports again; the first report moves aside and the verdict is the refined student's."""
    result = run_cli(
        tmp_path,
        f"data.source.cache_dir={tmp_path / 'cache'}",  # its own loop state: the smoke test globs the shared one
        "distill.teacher_budget=75",
        "distill_report.gate.min_distance_fraction=0.97",
        "distill_report.refine.passes=1",
        "distill_report.refine.frames=4",
        "distill_report.refine.epochs=3",
    )
    output = result.stdout + result.stderr
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert result.returncode == (0 if metrics["distill/verdict"] == "pass" else EXIT_VERDICT_FAILED), output[-4000:]
    first = json.loads((run / "refine" / "pass_0" / "distill_report.json").read_text())
    assert first["gate/passed"] == 0.0 and "became unstable" in first["reasons"][0]
    assert metrics["distill/refine/pass_1/gate_reasons"] == first["reasons"][:1]
    assert (first["seed"], metrics["distill/seed"]) == (0, 1)  # the refined student's MD follows new trajectories
    # The budget left after the loop pays for the frames: 75 calls in all, at most 4 frames.
    loop_calls = first["teacher_calls/train"]
    assert metrics["distill/refine/frames"] == min(4, 75 - loop_calls) > 0
    assert metrics["distill/teacher_calls/train"] == loop_calls + metrics["distill/refine/teacher_calls"] <= 75
    labelled = ase.io.read(run / "refine" / "pass_1" / "labelled.extxyz", ":")
    assert len(labelled) == metrics["distill/refine/frames"]
    provenance = "gate:trajectory=0:segment=nvt:failure=unstable:step="
    assert all(a.info["provenance"].startswith(provenance) for a in labelled)
    assert all(a.info["config_type"] == "gate_failure" and "forces" in a.calc.results for a in labelled)
    # The frames are the last of those kept before the failure, the very last included.
    window = ase.io.read(run / "refine" / "pass_0" / "gate_failure_frames.extxyz", ":")
    assert labelled[-1].info["step"] == window[-1].info["step"] < first["gate/nvt/time_ps"] * 1000 / 2
    # Training split + the frames; validation and test the same structures as before (the test set of both reports).
    sets = {name: ase.io.read(run / "refine" / "pass_1" / f"{name}.extxyz", ":") for name in ("train", "val", "test")}
    assert sum(a.info.get("config_type") == "gate_failure" for a in sets["train"]) == len(labelled)
    assert not any(a.info.get("config_type") == "gate_failure" for a in sets["val"] + sets["test"])
    assert len(sets["test"]) == first["test/num_structures"] == metrics["distill/test/num_structures"]
    assert metrics["distill/student_checkpoint"] == str(run / "checkpoints" / "refine_1" / "best_model.pt")
    assert Path(metrics["distill/student_checkpoint"]).is_file() and (run / "checkpoints" / "best_model.pt").is_file()
    assert "refinement pass 1: labelling" in output


def test_a_budget_too_small_for_the_splits_stops_before_any_work(tmp_path):
    # per_round is no limit here: the 80-call budget is, once round 0's MD and seed are paid.
    result = run_cli(tmp_path, "distill.per_round=1000", "data.num_test=70", f"data.source.cache_dir={tmp_path / 'c'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(
        r"can hold at most (\d+) structures .*teacher_budget=80 pays for them at 1 teacher call each", result.stderr
    )
    assert int(re.search(r"at most (\d+)", result.stderr).group(1)) < 80 and "data.num_test=70" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]
    assert not (tmp_path / "c").exists()  # nothing sampled or labelled


def test_a_missing_teacher_package_stops_before_any_work(monkeypatch):
    import importlib.util

    from mlff_distiller.teachers import calculators

    real = importlib.util.find_spec
    monkeypatch.setattr(
        calculators.importlib.util, "find_spec", lambda name, *a: None if name == "chgnet" else real(name, *a)
    )
    with pytest.raises(calculators.TeacherUnavailableError, match=r"Install it with: pip install chgnet"):
        calculators.require_teacher("chgnet")
    calculators.require_teacher("emt")
