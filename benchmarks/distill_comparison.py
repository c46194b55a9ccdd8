"""Accuracy against teacher calls: random sampling, the active loop, + site energies, + Hessian rows (finite
differences / autograd), each at the same teacher-call budget, for one teacher and one system.

Each variant is one ``mlff-train experiment=distill_<teacher>[_water]`` run with ``distill.teacher_budget`` set
to the same value; the script prints the table (teacher calls, fresh-frame and sampled-split force errors,
stability gate, verdict, wall time) and writes ``comparison.json`` and ``comparison.png`` (fresh-frame force
MAE against teacher calls, per variant: the loop's committee after each round, and the final student).

    python benchmarks/distill_comparison.py --teacher chgnet --system cuau --budget 400
    python benchmarks/distill_comparison.py --teacher sevenn --system water --budget 400 --variants oneshot active
    python benchmarks/distill_comparison.py --dry-run        # print the commands only
    python benchmarks/distill_comparison.py --variants active+hessian -- data.num_val=8 data.num_test=8
                                                             # overrides for every variant: after --variants, a --
    python benchmarks/distill_comparison.py --teacher sevenn --merge a/comparison.json b/comparison.json --out both
                                                             # one table and plot from earlier invocations

Variants:
  oneshot          random sampling: round 0 only, its rattled copies raised to spend the whole budget
  random           the active loop's exploration, candidates drawn uniformly (distill.selection=random)
  active           the active loop (committee disagreement in the trust window)
  active+site      + the teacher's site energies as labels and a loss term (weight 1)
  active+hessian   + 2 Hessian rows per structure by finite differences (2 teacher calls each)
  active+hessian_autograd  + 2 Hessian rows by autograd through the teacher (1 extra call in all)

Run it on a quiet machine: every run takes minutes of teacher and student time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "oneshot": ["distill.rounds=0"],
    "random": ["distill.selection=random"],
    "active": [],
    "active+site": ["data.source.site_energies=true", "loss.site_energy_weight=1.0"],
    "active+hessian": ["loss=energy_force_hessian", "data.source.hessian_rows=2", "data.source.hessian_method=fd"],
    "active+hessian_autograd": [
        "loss=energy_force_hessian",
        "data.source.hessian_rows=2",
        "data.source.hessian_method=autograd",
    ],
}
"""Each variant's overrides of ``experiment=distill_<teacher>[_water]`` (a variant that fails to compose or run is
reported as not measured, with mlff-train's last line)."""


def round0_cost(experiment: str, overrides: list[str]) -> tuple[object, int, int]:
    """(the composed config, round 0's largest cost in teacher calls, its structures other than rattled copies)."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    import mlff_distiller.train  # noqa: F401  (registers the trainer schema)

    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=.", *overrides])
    sampling = instantiate(cfg.data.source)
    most, cost = sampling.largest_cost()
    return cfg, cost, most - sampling.num_rattle


def plan(experiment: str, overrides: list[str], budget: int, oneshot: bool) -> list[str]:
    """Overrides that make a variant spend ``budget`` teacher calls. One-shot random sampling puts the whole
    budget into round 0's rattled copies. A loop variant whose structures cost more (Hessian rows) gets fewer
    rattled copies, so that its round 0 costs no more than the plain recipe's; the rest of the budget is spread
    over the rounds (``distill.per_round``), the budget itself ending the last round."""
    _, base, _ = round0_cost(experiment, [])
    cfg, cost, fixed = round0_cost(experiment, overrides)
    sampling = cfg.data.source
    per = 1 + 2 * int(sampling.hessian_rows)
    md_calls = cost - (fixed + sampling.num_rattle) * per
    if oneshot:
        return [f"data.source.num_rattle={max(0, (budget - md_calls) // per - fixed)}"]
    extra = []
    if cost > base:
        rattles = max(0, (base - md_calls) // per - fixed)
        cost = (fixed + rattles) * per + md_calls
        extra.append(f"data.source.num_rattle={rattles}")
    rounds = max(1, int(cfg.distill.rounds))
    per_round = -(-(budget - cost) // (rounds * per)) + 5
    return [*extra, f"distill.per_round={max(1, per_round)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=("chgnet", "sevenn"), default="chgnet")
    parser.add_argument("--system", choices=("cuau", "water"), default="cuau")
    parser.add_argument("--budget", type=int, default=400, help="teacher calls for training labels, per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("distill_comparison"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print one table and draw one plot from these comparison.json files (e.g. a variant rerun "
        "with its own overrides), rows in the order given; --teacher, --system and --budget name them",
    )
    parser.add_argument("overrides", nargs="*", help="extra mlff-train overrides for every variant")
    args = parser.parse_args()

    if args.merge:
        if (args.out / "comparison.json").exists():
            parser.error(f"--merge would overwrite {args.out / 'comparison.json'}; give a new --out directory.")
        rows = [row for path in args.merge for row in json.loads(path.read_text())]
        finish(rows, args)
        return
    experiment = f"distill_{args.teacher}" + ("_water" if args.system == "water" else "")
    binary = Path(sys.executable).parent / "mlff-train"
    rows = []
    for name in args.variants:
        overrides = [f"distill.teacher_budget={args.budget}", *VARIANTS[name], *args.overrides]
        try:
            overrides += plan(experiment, overrides, args.budget, oneshot=name == "oneshot")
        except Exception as error:  # e.g. an option of the site-energy / autograd labelling that is not there
            rows.append({"variant": name, "skipped": f"{type(error).__name__}: {error}".splitlines()[0]})
            print(f"  {name}: not measured: {rows[-1]['skipped']}", flush=True)
            continue
        run_dir = (args.out / f"{args.teacher}_{args.system}_{name}").resolve()
        command = [str(binary), f"experiment={experiment}", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
        print(" ".join(command), flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        result = subprocess.run(command, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True)
        wall = time.perf_counter() - started
        row = {"variant": name, "exit_code": result.returncode, "wall_s": round(wall, 1)}
        metrics_file = run_dir / "metrics.json"
        if result.returncode == 2 or not metrics_file.exists():
            row["skipped"] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no metrics.json"
            rows.append(row)
            print(f"  {name}: not measured: {row['skipped']}", flush=True)
            continue
        metrics = json.loads(metrics_file.read_text())
        report = json.loads((run_dir / "distill_report.json").read_text())
        row.update(
            {
                "teacher_calls": metrics.get("distill/teacher_calls/train"),
                "fresh_force_mae": metrics.get("distill/fresh/force_mae"),
                "fresh_force_mae_rel": metrics.get("distill/fresh/force_mae_rel"),
                "test_force_mae": metrics.get("distill/test/force_mae"),
                "test_force_mae_rel": metrics.get("distill/test/force_mae_rel"),
                "gate_passed": metrics.get("distill/gate/passed"),
                "bulk_modulus_rel_error": metrics.get("distill/observables/bulk_modulus_rel_error"),
                "frequency_mae_rel": metrics.get("distill/observables/frequency_mae_rel"),
                "verdict": metrics.get("distill/verdict"),
                "reasons": metrics.get("distill/reasons"),
                "learning_curve": report.get("learning_curve", []),
            }
        )
        rows.append(row)
    if not args.dry_run:
        finish(rows, args)


def finish(rows: list[dict], args: argparse.Namespace) -> None:
    """Write ``comparison.json``, print the table and draw ``comparison.png`` into ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows, args)
    plot(rows, args.out / "comparison.png", f"{args.teacher}, {args.system}, budget {args.budget} teacher calls")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    def cell(value, scale=1.0, digits=3):
        return "-" if value is None else f"{scale * value:.{digits}g}"

    print(f"\n{args.teacher} / {args.system}, teacher budget {args.budget} calls per variant")
    header = "| variant | teacher calls | fresh force MAE (meV/Å) | fresh / std (%) | test / std (%) | B rel err (%) |"
    header += " freq MAE rel (%) | gate | verdict | wall (s) |"
    print(header)
    print("|" + "---|" * 10)
    for row in rows:
        if "skipped" in row:
            print(f"| {row['variant']} | not measured: {row['skipped']} |" + " |" * 8)
            continue
        gate = {1.0: "pass", 0.0: "fail"}.get(row["gate_passed"], "-")
        print(
            f"| {row['variant']} | {row['teacher_calls']} | {cell(row['fresh_force_mae'])} | "
            f"{cell(row['fresh_force_mae_rel'], 100)} | {cell(row['test_force_mae_rel'], 100)} | "
            f"{cell(row['bulk_modulus_rel_error'], 100)} | {cell(row['frequency_mae_rel'], 100)} | {gate} | "
            f"{row['verdict']} | {row['wall_s']} |"
        )


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot")
        return
    from matplotlib.ticker import ScalarFormatter

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        curve = row.get("learning_curve") or []
        # The rounds' points are the loop's committee (a cheaper student), the "final" one the final student: a
        # line joining them would read as one model learning.
        rounds = [p for p in curve if len(p) < 3 or p[2] != "final"]
        final = [p for p in curve if len(p) > 2 and p[2] == "final"]
        colour = None
        if rounds:
            (line,) = axis.plot(
                [p[0] for p in rounds],
                [100 * p[1] for p in rounds],
                marker="o",
                markersize=4,
                linestyle="--",
                linewidth=1,
                label=f"{row['variant']}: committee per round",
            )
            colour = line.get_color()
        if final:
            axis.plot(
                [p[0] for p in final],
                [100 * p[1] for p in final],
                marker="*",
                markersize=13,
                linestyle="none",
                color=colour,
                label=f"{row['variant']}: final student",
            )
    axis.axhline(2.0, color="0.6", linestyle="--", linewidth=1, label="target 2 %")
    axis.set_xlabel("teacher calls for training labels")
    axis.set_ylabel("fresh-frame force MAE (% of teacher force std)")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
