"""The README's Python example runs unchanged and learns."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "Trainer(model=student_model" in b)
    monkeypatch.chdir(tmp_path)  # the example writes checkpoints/ relative to the working directory
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    history = namespace["history"]
    assert len(history["train/loss"]) == 100
    assert history["val/loss"][-1] < 0.2 * history["val/loss"][0]
    assert (tmp_path / "checkpoints" / "best_model.pt").is_file()
    assert namespace["trainer"].best_metric == min(history["val/loss"])


def test_readme_student_calculator_example_runs(tmp_path, monkeypatch):
    """The 'Using the student' block runs MD with a checkpoint written by `mlff-train experiment=smoke`."""
    import subprocess
    import sys

    binary = Path(sys.executable).parent / "mlff-train"
    subprocess.run(
        [str(binary), "experiment=smoke", "hydra.run.dir=run"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=240,
    )
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "StudentCalculator.from_checkpoint" in b)
    checkpoint = tmp_path / "run" / "checkpoints" / "best_model.pt"
    example = re.sub(r'from_checkpoint\("[^"]+"\)', f'from_checkpoint("{checkpoint}")', example)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    atoms = namespace["atoms"]
    assert atoms.get_potential_energy() == atoms.calc.results["energy"]
    assert abs(atoms.get_forces().sum(axis=0)).max() < 1e-3  # momentum conserved: forces sum to zero
    assert (atoms.get_positions() != namespace["bulk"]("Cu", "fcc", a=3.61, cubic=True).repeat(2).positions).any()
