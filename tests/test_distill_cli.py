"""`mlff-train experiment=distill_smoke`: the distillation path end to end (sample, label with Hessian rows,
train with the Hessian loss, report student vs teacher) with EMT standing in for the foundation model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "mlff-train").exists(), reason="mlff-train is not installed")


def test_distill_smoke_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [str(BIN / "mlff-train"), "experiment=distill_smoke", "logger=none", "hydra.run.dir=run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "parity.png").stat().st_size > 1000
    assert metrics["distill/test/num_structures"] >= 4
    assert 0 < metrics["distill/test/hessian_mae"] < 1e6 and 0 < metrics["distill/test/force_mae"] < 5000
    assert metrics["distill/speed/32/student_per_s"] > 0 and metrics["distill/speed/32/teacher_per_s"] > 0
    assert metrics["distill/md/stable"] in (0.0, 1.0, True, False)
    assert "Student vs teacher" in output and "hessian_mae" in output
    # The labelled file keeps each structure's provenance and its teacher Hessian rows.
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "mlff_distiller/datasets"
    (data_file,) = [
        p for p in cache.glob("distill_*.extxyz") if ".sampled." not in p.name and ".partial." not in p.name
    ]
    structures = ase.io.read(data_file, ":")
    assert all("provenance" in atoms.info for atoms in structures)
    assert any(atoms.info["provenance"].startswith("md:") for atoms in structures)
    assert all("hessian_rows" in atoms.arrays for atoms in structures)


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
