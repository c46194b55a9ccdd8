"""The default job, end to end, for each student: wall time, test errors against the spread of the
labels, and the learning curve (validation force MAE against wall time).

    python benchmarks/default_job.py [--models schnet painn] [--out benchmarks/results] [-- extra overrides]

Each model runs `mlff-train model=NAME` in a subprocess (dataset generation included the first
time; later runs reuse the cache). Prints one table of results and one of learning curves, and
writes `learning_curve.png` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(model: str, out: Path, extra: list[str]) -> dict:
    run_dir = out / model
    if run_dir.exists():
        shutil.rmtree(run_dir)
    binary = Path(sys.executable).parent / "mlff-train"
    command = [str(binary) if binary.exists() else "mlff-train", f"model={model}", f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]
    elapsed, curve = 0.0, []
    for epoch_time, mae in zip(history["epoch_time_s"], history["val/force_mae"]):
        elapsed += epoch_time
        curve.append((elapsed, mae))
    return {"wall_s": wall, "metrics": metrics, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["schnet", "painn"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("overrides", nargs="*", help="extra mlff-train overrides")
    args = parser.parse_args()
    results = {model: run(model, args.out, args.overrides) for model in args.models}

    print(f"{'model':<8}{'wall (s)':>10}{'E MAE meV/atom':>16}{'F MAE meV/Å':>13}{'F std meV/Å':>13}{'F MAE/std':>11}")
    for model, result in results.items():
        m = result["metrics"]
        print(
            f"{model:<8}{result['wall_s']:>10.1f}{m['test/energy_mae_per_atom']:>16.2f}{m['test/force_mae']:>13.1f}"
            f"{m['test/force_std']:>13.0f}{m['test/force_mae'] / m['test/force_std']:>10.2%}"
        )
    print("\nvalidation force MAE (meV/Å) against training wall time (s), every 5th epoch:")
    for model, result in results.items():
        points = result["curve"][4::5] or result["curve"]
        print(f"{model:<8}" + "  ".join(f"{t:.0f}s:{mae:.1f}" for t, mae in points))
    summary = {model: {"wall_s": r["wall_s"], **r["metrics"], "curve": r["curve"]} for model, r in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "default_job.json").write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for model, result in results.items():
        times, maes = zip(*result["curve"])
        axis.plot(times, maes, marker="o", markersize=3, label=model)
    axis.set(xlabel="training wall time (s)", ylabel="validation force MAE (meV/Å)", yscale="log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "learning_curve.png", dpi=120)


if __name__ == "__main__":
    main()
