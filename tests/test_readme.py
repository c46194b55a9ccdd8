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
