"""Training steps per second of the SchNet and PaiNN students on a GPU, eager against compiled (`model.compile`).

    python benchmarks/gpu_training.py [--device cuda|cpu] [--models schnet painn] [--batch-sizes 32 256]
        [--steps 20] [--warmup 3] [--compile inductor] [--budget 170] [--json PATH] [--quick]

The default job's task (`_task.py`: the built-in Cu-Au EMT set of 32-atom cells; SchNet / PaiNN 64x3 with stress;
the energy/force/stress loss 10/30/1). One step = forward (energy, forces and stress by autograd), loss, backward,
gradient clipping and an Adam step. Two batches: 32 structures (1,024 atoms, the other benchmarks' batch) and 256
(8,192 atoms). The batches are collated and moved to the device before timing: the data pipeline is not measured.
Each (model, mode) runs in a fresh process: warm-up steps first (compiled: the first one traces the energy/forces/
stress graph, compiles it and checks it against the eager model; that time is reported apart), then `--steps`
steps between two `torch.cuda.synchronize()`. A compiled model that ran eagerly instead (a trace or compilation
that failed, or a graph that disagreed with eager on its first batch) is marked so, with the reason it logged.

The eager processes run first; the compiled ones get what is left of `--budget` seconds, so a compilation that
overruns costs its own row only. Prints steps/s, ms/step, atoms/s and peak memory per row, the compiled/eager
ratios, the device, torch and CUDA versions; `--json PATH` writes the same after every process (a run cut short
keeps what it measured).

`--quick` checks that the script runs (e.g. `--device cpu --quick`): 1 warm-up and 1 timed step, batches of 2 and
4 structures, and compile mode `fx` (the traced graph without inductor, which compiles for minutes on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent


def measure(model_name: str, mode: str, device: str, batch_sizes: list[int], steps: int, warmup: int) -> list[dict]:
    """One row per batch size for one student in one mode ("none": eager), in this process."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import _task

    from mlff_distiller.data.batch import collate_atoms
    from mlff_distiller.memory import keep_freed_memory

    keep_freed_memory()  # what the Trainer's fit() does
    fallbacks: list[str] = []

    class Fallbacks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fallbacks.append(record.getMessage())

    logging.getLogger("mlff_distiller.models.compiled").addHandler(Fallbacks(logging.WARNING))
    target = torch.device(device)
    cuda = target.type == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(target)

    data = _task.data_module()
    dataset = data.datasets["train"]
    model = _task.student(model_name, data).to(target)
    model.set_compile(mode)
    model.train()
    loss_fn = _task.loss_function()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=_task.LEARNING_RATE)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()

    def step(batch: Any) -> None:
        loss_fn(model, batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, _task.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    for size in batch_sizes:
        count = max(1, min(4, len(order) // size))  # a few different batches, cycled
        batches = [
            collate_atoms([dataset[i] for i in order[k * size : (k + 1) * size]]).to(target) for k in range(count)
        ]
        synchronize()
        start = time.perf_counter()
        for index in range(warmup):
            step(batches[index % count])
        synchronize()
        warmup_s = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats(target)
        start = time.perf_counter()
        for index in range(steps):
            step(batches[(warmup + index) % count])
        synchronize()
        elapsed = time.perf_counter() - start
        atoms = sum(batches[(warmup + index) % count].num_atoms_total for index in range(steps)) / steps
        # The graph really ran: traced, (compiled,) and checked against eager on its first batch; None: eager mode.
        graphs = model.compiled.graphs if model.compiled is not None else {}
        compiled = (
            bool(graphs) and all(g is not None and g.checked for g in graphs.values()) if mode != "none" else None
        )
        rows.append(
            {
                "model": model_name,
                "mode": "eager" if mode == "none" else mode,
                "batch_structures": size,
                "atoms_per_step": atoms,
                "steps_per_s": steps / elapsed,
                "ms_per_step": 1e3 * elapsed / steps,
                "atoms_per_s": atoms * steps / elapsed,
                "peak_memory_gib": torch.cuda.max_memory_allocated(target) / 2**30 if cuda else None,
                "warmup_s": warmup_s,
                "compiled": compiled,
                "note": "; ".join(dict.fromkeys(fallbacks)),
            }
        )
    return rows


RUNNING: list[subprocess.Popen] = []
"""The child measuring now. It has a session of its own, so that a compilation cut short takes its workers along."""


def stop_children(signum: int, frame: Any) -> None:
    """On SIGTERM (e.g. an outer `timeout`) end the child's session too: it is outside our process group."""
    for process in RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_child(task: dict, timeout: float) -> tuple[list[dict], str | None]:
    """``measure`` in a fresh process: its rows, or an error line."""
    command = [sys.executable, __file__, "--child", json.dumps(task)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    RUNNING.append(process)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return [], f"stopped after {timeout:.0f} s (the budget)"
    finally:
        RUNNING.remove(process)
    if process.returncode:
        return [], f"failed ({process.returncode}): {' | '.join(err.strip().splitlines()[-3:])}"
    return json.loads(out.strip().splitlines()[-1]), None


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = f"CPU ({torch.get_num_threads()} threads)"
    return info


def ratios(rows: list[dict]) -> list[dict]:
    """Compiled over eager steps/s, per model and batch size (rows whose graph really ran)."""
    eager = {(r["model"], r["batch_structures"]): r for r in rows if r["mode"] == "eager"}
    out = []
    for row in rows:
        base = eager.get((row["model"], row["batch_structures"]))
        if row["mode"] != "eager" and base is not None and row["compiled"]:
            ratio = row["steps_per_s"] / base["steps_per_s"]
            out.append(
                {
                    "model": row["model"],
                    "mode": row["mode"],
                    "batch_structures": row["batch_structures"],
                    "compiled_over_eager": ratio,
                }
            )
    return out


def report(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--models", nargs="+", default=["schnet", "painn"], choices=["schnet", "painn"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256], help="structures per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiled: the compilation)")
    parser.add_argument("--compile", default="inductor", choices=["inductor", "fx"], help="the compiled mode")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all processes together")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="1+1 steps, batches of 2 and 4, compile=fx")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if args.quick:
        args.steps, args.warmup, args.batch_sizes, args.compile = 1, 1, [2, 4], "fx"

    signal.signal(signal.SIGTERM, stop_children)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, f"--device {args.device}: CUDA is not available here (use --device cpu).\n")
    sys.path.insert(0, str(BENCHMARKS))
    import _task

    started = time.perf_counter()
    data = _task.data_module()  # build (or find) the cached dataset once, before the timed processes
    result: dict[str, Any] = {
        **environment(args.device),
        "task": "default job: Cu-Au EMT set (32-atom cells), 64x3 student with stress, loss 10/30/1, Adam, clip 10",
        "train_structures": len(data.datasets["train"]),
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_mode": args.compile,
        "rows": [],
        "errors": [],
    }
    print(
        f"{result['device_name']}, torch {result['torch']} (CUDA {result['cuda']}); data ready in "
        f"{time.perf_counter() - started:.1f} s; {args.steps} timed steps after {args.warmup} warm-up, per row"
    )
    deadline = time.monotonic() + args.budget
    plan = [(name, "none") for name in args.models] + [(name, args.compile) for name in args.models]
    for name, mode in plan:
        remaining = deadline - time.monotonic()
        label = f"{name} {'eager' if mode == 'none' else mode}"
        if remaining < 5:
            result["errors"].append(f"{label}: not run, the budget of {args.budget:.0f} s is spent")
            continue
        task = {"model_name": name, "mode": mode, "device": args.device, "batch_sizes": args.batch_sizes}
        rows, error = run_child({**task, "steps": args.steps, "warmup": args.warmup}, remaining)
        if error:
            result["errors"].append(f"{label}: {error}")
            print(f"{label}: {error}", flush=True)
        for row in rows:
            result["rows"].append(row)
            memory = f"{row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] is not None else "-"
            state = {None: "", True: ", graph ran", False: ", ran EAGERLY: " + (row["note"] or "see its log")}
            print(
                f"{label:<17} batch {row['batch_structures']:>4} ({row['atoms_per_step']:>6.0f} atoms): "
                f"{row['steps_per_s']:8.2f} steps/s {row['ms_per_step']:9.2f} ms/step "
                f"{row['atoms_per_s'] / 1e3:9.1f} k atoms/s, peak {memory}, warm-up {row['warmup_s']:.1f} s"
                f"{state[row['compiled']]}",
                flush=True,
            )
        result["ratios"] = ratios(result["rows"])
        report(result, args.json)
    for ratio in result["ratios"]:
        label = f"{ratio['mode']}/eager {ratio['model']} batch {ratio['batch_structures']}"
        print(f"{label}: {ratio['compiled_over_eager']:.2f}x")
    result["total_s"] = time.perf_counter() - started
    report(result, args.json)
    print(f"total {result['total_s']:.0f} s" + (f"; written to {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
