"""Start-up: wall time of `mlff-train --help` and `mlff-train --cfg job`, and the time from process start
to the first optimizer step of `mlff-train experiment=smoke`, against `python -c "import torch"`.
Each is a fresh process; the commands alternate, after one warm-up round (file cache, dataset cache).
Also reports whether --help and --cfg job import torch (they need none of it).

    python benchmarks/startup.py [--repeats 5]

Target: --help and --cfg job at most 0.5x `import torch`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs mlff-train's entry point; prints the wall clock at the first optimizer step, then stops the process.
FIRST_STEP = """
import os, sys, time
from mlff_distiller.training import trainer as module
step = module.Trainer._optimizer_step
def first(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    print("FIRST_STEP", time.time(), flush=True)
    os._exit(0)
module.Trainer._optimizer_step = first
sys.argv = ["mlff-train", *sys.argv[1:]]
from mlff_distiller.train import main
main()
"""

# Runs mlff-train's entry point and reports whether torch was imported.
IMPORTS_TORCH = """
import sys
sys.argv = ["mlff-train", *sys.argv[1:]]
from mlff_distiller.train import main
try:
    main()
except SystemExit:
    pass
print("IMPORTS_TORCH", "torch" in sys.modules)
"""


def wall(command: list[str]) -> tuple[float, str]:
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.time() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    cli = Path(python).parent / "mlff-train"
    cli_cmd = [str(cli)] if cli.exists() else [python, "-m", "mlff_distiller.train"]
    with tempfile.TemporaryDirectory() as tmp:
        smoke = ["experiment=smoke", f"hydra.run.dir={tmp}/smoke"]
        commands = {
            'python -c "import torch"': [python, "-c", "import torch"],
            "mlff-train --help": [*cli_cmd, "--help"],
            "mlff-train --cfg job": [*cli_cmd, "--cfg", "job"],
            "smoke: to first step": [python, "-c", FIRST_STEP, *smoke],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for repeat in range(args.repeats + 1):
            for name, command in commands.items() if repeat % 2 else reversed(commands.items()):
                start = time.time()
                elapsed, out = wall(command)
                if name.startswith("smoke"):
                    elapsed = float(out.split("FIRST_STEP")[1].split()[0]) - start
                if repeat:
                    times[name].append(elapsed)
        torch_imported = {
            option: wall([python, "-c", IMPORTS_TORCH, option, *(["job"] if option == "--cfg" else [])])[1]
            .split("IMPORTS_TORCH")[1]
            .strip()
            for option in ("--help", "--cfg")
        }
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med['python -c "import torch"']
    print(f"Start-up, wall time from process start ({args.repeats} alternating runs, medians)")
    print(f"{'command':<28}{'wall (s)':>10}{'/ import torch':>16}{'imports torch':>15}")
    for name, value in med.items():
        imports = {"mlff-train --help": torch_imported["--help"], "mlff-train --cfg job": torch_imported["--cfg"]}
        print(f"{name:<28}{value:>10.2f}{value / base:>16.2f}{imports.get(name, ''):>15}")
    ratios = [med["mlff-train --help"] / base, med["mlff-train --cfg job"] / base]
    print(
        f"--help {ratios[0]:.2f}x and --cfg job {ratios[1]:.2f}x import torch (target <= 0.5x: "
        f"{'met' if max(ratios) <= 0.5 else 'NOT met'}); smoke job's first step at {med['smoke: to first step']:.2f} s"
    )


if __name__ == "__main__":
    main()
