"""`mlff-export` / `export_student`: the TorchScript file reproduces the eager student (energy, forces, stress to
1e-8 in float64) in a process that cannot import mlff_distiller, records cutoff, elements and units, and refuses
unseen elements."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from md_kit import alloy, cluster, student, student_checkpoint

from mlff_distiller.md.export import export_student
from mlff_distiller.md.potential import StudentPotential

torch.set_num_threads(1)

BIN = Path(sys.executable).parent
MLFF_EXPORT = str(BIN / "mlff-export") if (BIN / "mlff-export").exists() else shutil.which("mlff-export")

# Runs in a fresh interpreter in which `import mlff_distiller` fails: only torch and numpy are there to help.
LOADER = r"""
import json, sys
sys.modules["mlff_distiller"] = None  # any import of the package now raises ImportError
import numpy as np, torch
torch.set_num_threads(1)
cases = json.load(open(sys.argv[1]))
results = {}
for name, case in cases.items():
    model = torch.jit.load(case["file"])
    t = lambda key, dtype=torch.float64: torch.tensor(case[key], dtype=dtype)
    out = model.compute(t("positions"), t("numbers", torch.long), t("cell"), t("pbc", torch.bool))
    edge_index, _ = model.neighbor_list(t("positions"), t("cell"), t("pbc", torch.bool))
    results[name] = {key: value.tolist() for key, value in out.items()}
    results[name]["edges"] = int(edge_index.shape[1])
    results[name]["cutoff"] = model.cutoff
    results[name]["elements"] = list(model.elements)
    try:
        bad = t("numbers", torch.long).clone()
        bad[0] = 47
        model.compute(t("positions"), bad, t("cell"), t("pbc", torch.bool))
        results[name]["refused"] = False
    except Exception as error:
        results[name]["refused"] = "never trained on" in str(error)
json.dump(results, open(sys.argv[2], "w"))
"""


def test_the_exported_file_reproduces_the_student_without_the_package(tmp_path):
    cases, expected = {}, {}
    # painn-zbl: with the repulsion prior, which acts here (Cu-Cu reach 2.64 Å; neighbours at ~2.6 Å)
    for name in ("schnet", "painn", "painn-zbl"):
        model = student(name.removesuffix("-zbl"), seed=3, zbl=name.endswith("-zbl"))
        path = tmp_path / f"{name}.pt"
        metadata = export_student(model, path, dtype=torch.float64)
        assert metadata["cutoff"] == 4.0 and metadata["elements"] == [29, 79] and metadata["units"]["forces"] == "eV/Å"
        files = {"metadata.json": ""}
        torch.jit.load(str(path), _extra_files=files)
        assert json.loads(files["metadata.json"]) == metadata
        potential = StudentPotential(model, dtype=torch.float64, skin=0.0)
        for size, atoms in (("32", alloy(seed=4)), ("108", alloy(repeat=3, seed=5)), ("cluster", cluster())):
            key = f"{name}-{size}"
            cases[key] = {
                "file": str(path),
                "positions": atoms.positions.tolist(),
                "numbers": atoms.numbers.tolist(),
                "cell": atoms.cell.array.tolist(),
                "pbc": atoms.pbc.tolist(),
            }
            out = potential(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, stress=True)
            expected[key] = {k: v.numpy() for k, v in out.items()}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    for key, reference in expected.items():
        out = got[key]
        assert out["cutoff"] == 4.0 and out["elements"] == [29, 79] and out["refused"] is True
        assert out["edges"] > 0
        np.testing.assert_allclose(out["energy"], reference["energy"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(out["forces"], reference["forces"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(out["stress"], reference["stress"], rtol=0, atol=1e-8)
        assert np.abs(reference["forces"]).max() > 1e-3


@pytest.mark.skipif(MLFF_EXPORT is None, reason="mlff-export is not installed (pip install -e .)")
def test_mlff_export_writes_the_checkpoints_student(tmp_path):
    checkpoint = student_checkpoint(tmp_path)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    output = tmp_path / "exported.pt"
    command = [MLFF_EXPORT, f"ckpt_path={checkpoint}", f"output={output}", "dtype=float64", "hydra.run.dir=run"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    exported = torch.jit.load(str(output))
    atoms = alloy(seed=6)
    out = exported.compute(
        torch.tensor(atoms.positions), torch.tensor(atoms.numbers), torch.tensor(atoms.cell.array),
        torch.tensor(atoms.pbc),
    )  # fmt: skip
    reference = StudentPotential(student("schnet"), dtype=torch.float64)(
        atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc
    )
    np.testing.assert_allclose(out["forces"].numpy(), reference["forces"].numpy(), rtol=0, atol=1e-8)
    bad = subprocess.run(
        [MLFF_EXPORT, f"ckpt_path={tmp_path / 'missing.pt'}", "hydra.run.dir=run2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "missing.pt" in bad.stderr and "does not exist" in bad.stderr
