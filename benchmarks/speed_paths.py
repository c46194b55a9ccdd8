"""The students' speed paths against the previous code, side by side in one run: a training step of the
default job (SchNet, PaiNN) and energy+forces calls through `StudentCalculator` (32, 256, 2048 atoms).

    python benchmarks/speed_paths.py [--what train infer] [--models schnet painn] [--rounds 3] [--compile]

The previous code is rebuilt in the same checkout by switching each change off:

* ``basis=uncut``: the Gaussian radial basis without its e^-50 floor (denormal tails, as before);
* ``pairing=forward``: edges not paired by the data pipeline, so the students sort them in each forward;
* ``memory=default``: glibc's malloc as it comes (``keep_freed_memory`` not called);
* ``compile=inductor`` (with ``--compile``): the traced graph compiled by inductor; its compilation
  (the first steps) is reported apart from the steady-state step time.

Every variant runs in a fresh process (the memory setting is process-wide), 1 thread, and the
variants alternate within each round; the tables give medians over rounds and the ratio to the
previous code. Training batches cycle through the default job's loader (different sizes each step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREVIOUS = {"basis": "uncut", "pairing": "forward", "memory": "default", "compile": "none"}
VARIANTS = {
    "previous": PREVIOUS,
    "+ pipeline pairing": {**PREVIOUS, "pairing": "pipeline"},
    "+ cut basis": {**PREVIOUS, "pairing": "pipeline", "basis": "cut"},
    "all (pairing, basis, memory)": {"basis": "cut", "pairing": "pipeline", "memory": "keep", "compile": "none"},
}
COMPILED = {"all + compile=inductor": {"basis": "cut", "pairing": "pipeline", "memory": "keep", "compile": "inductor"}}


def apply_variant(variant: dict[str, str]) -> None:
    """Switch this process to a variant (before any model or graph is built)."""
    import torch

    import mlff_distiller.calculator
    import mlff_distiller.data.dataset
    from mlff_distiller.memory import keep_freed_memory
    from mlff_distiller.models import common

    if variant["memory"] == "keep":
        keep_freed_memory()
    mlff_distiller.calculator.keep_freed_memory = lambda: False  # the calculator must not switch it on
    if variant["pairing"] == "forward":
        mlff_distiller.data.dataset.reverse_pair_order = lambda edge_index, shifts: None
    if variant["basis"] == "uncut":

        def uncut(self, distances: torch.Tensor) -> torch.Tensor:
            return torch.exp(self.coefficient * (distances.unsqueeze(-1) - self.centers) ** 2 + self.log_prefactor)

        common.GaussianRBF.forward = uncut


def train_child(model_name: str, variant: dict[str, str], steps: int) -> dict:
    import torch

    apply_variant(variant)
    sys.path.insert(0, str(Path(__file__).parent))
    import _task

    torch.set_num_threads(1)
    data = _task.data_module()
    model = _task.student(model_name, data)
    model.set_compile(variant["compile"])
    loss = _task.loss_function()
    model.train()
    batches = list(data.train_loader())
    start = time.perf_counter()
    for batch in batches[:2]:  # warm-up; with compile=inductor, the compilation
        loss(model, batch)["loss"].backward()
    warmup = time.perf_counter() - start
    times, cpu_times = [], []
    for step in range(steps):
        batch = batches[(2 + step) % len(batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss(model, batch)["loss"].backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times), "warmup_s": warmup}
    if model.compiled is not None:
        from torch._dynamo.utils import counters

        result["traces"] = model.compiled.traces
        result["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])
    return result


def infer_child(model_name: str, variant: dict[str, str], size: int, repeats: int) -> dict:
    import torch

    apply_variant(variant)
    sys.path.insert(0, str(Path(__file__).parent))
    from student_speed import calculator, cell

    torch.set_num_threads(1)
    calc = calculator(model_name)
    calc.model.set_compile(variant["compile"])
    atoms = cell(size)
    start = time.perf_counter()
    atoms.calc = calc
    atoms.get_forces()  # warm-up (and compilation)
    warmup = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        atoms.positions[0, 0] += 1e-4  # a new geometry every call: no cached results
        start, cpu_start = time.perf_counter(), time.process_time()
        atoms.get_potential_energy()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"rate": 1 / statistics.median(times), "cpu_rate": 1 / statistics.median(cpu_times), "warmup_s": warmup}


def run_child(args: list[str]) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        print(f"  failed: {' '.join(args)}: {out.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--models", nargs="+", default=["schnet", "painn"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (alternating)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process (2 above 1000 atoms)")
    parser.add_argument("--compile", action="store_true", help="add compile=inductor (minutes of compilation)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task = json.loads(args.child)
        if task["what"] == "train":
            result = train_child(task["model"], task["variant"], args.steps)
        else:
            result = infer_child(task["model"], task["variant"], task["size"], args.repeats)
        print(json.dumps(result))
        return
    variants = {**VARIANTS, **(COMPILED if args.compile else {})}
    if "train" in args.what:
        sys.path.insert(0, str(Path(__file__).parent))
        import _task

        _task.data_module()  # build (or find) the cached dataset once, before the timed children
        for model in args.models:
            results: dict[str, list[dict]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, variant in variants.items():
                    task = json.dumps({"what": "train", "model": model, "variant": variant})
                    result = run_child(["--child", task, "--steps", str(args.steps)])
                    if result:
                        results[name].append(result)
            previous = results["previous"]
            base = {k: statistics.median(r[k] for r in previous) for k in ("ms", "cpu_ms")} if previous else None
            print(f"\n{model}: default-job training step (forward + energy/force/stress loss backward), 1 thread")
            print(f"{'variant':<30}{'ms/step':>10}{'/previous':>11}{'CPU ms':>10}{'/previous':>11}{'warm-up s':>11}")
            for name, rows in results.items():
                if not rows:
                    continue
                ms, cpu_ms = (statistics.median(r[k] for r in rows) for k in ("ms", "cpu_ms"))
                extra = ""
                if "traces" in rows[0]:
                    extra = f"   traces {rows[0]['traces']}, dynamo graphs {rows[0]['dynamo_graphs']}"
                ratios = [
                    f"{v / base[k]:>11.2f}" if base else f"{'-':>11}" for k, v in (("ms", ms), ("cpu_ms", cpu_ms))
                ]
                warmup = statistics.median(r["warmup_s"] for r in rows)
                print(f"{name:<30}{ms:>10.1f}{ratios[0]}{cpu_ms:>10.1f}{ratios[1]}{warmup:>11.1f}{extra}")
    if "infer" in args.what:
        chosen = {k: v for k, v in variants.items() if k in ("previous", "all (pairing, basis, memory)")}
        chosen.update(COMPILED if args.compile else {})
        for model in args.models:
            rates: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.sizes} for name in chosen}
            for _ in range(args.rounds):
                for size in args.sizes:
                    for name, variant in chosen.items():
                        task = json.dumps({"what": "infer", "model": model, "variant": variant, "size": size})
                        repeats = args.repeats if size < 1000 else 2
                        result = run_child(["--child", task, "--repeats", str(repeats)])
                        if result:
                            rates[name][size].append(result)
            for key, label in (("rate", "wall"), ("cpu_rate", "CPU time")):
                print(f"\n{model}: energy+forces calls/s ({label}) through StudentCalculator, neighbour list included")
                _print_rates(rates, args.sizes, key)


def _print_rates(rates: dict[str, dict[int, list[dict]]], sizes: list[int], key: str) -> None:
    big, small = max(sizes), sorted(sizes)[-2] if len(sizes) > 1 else None
    scaling_label = f"µs/atom {big}/{small}" if small else ""
    print(f"{'variant':<30}{''.join(f'{n:>9}' for n in sizes)}   {scaling_label:>16}")
    medians = {
        name: {n: statistics.median(r[key] for r in rows) for n, rows in by_size.items() if rows}
        for name, by_size in rates.items()
    }
    for name, rate in medians.items():
        cols = "".join(f"{rate[n]:>9.1f}" if n in rate else f"{'-':>9}" for n in sizes)
        ok = small and big in rate and small in rate
        scaling = f"{(rate[small] * small) / (rate[big] * big):>16.2f}" if ok else f"{'-':>16}"
        print(f"{name:<30}{cols}   {scaling}")
        previous = medians.get("previous", {})
        if name != "previous" and previous:
            ratio = "".join(
                f"{rate[n] / previous[n]:>8.2f}x" if n in rate and n in previous else f"{'-':>9}" for n in sizes
            )
            print(f"{'  speed-up over previous':<30}{ratio}")


if __name__ == "__main__":
    main()
