"""What the Hydra command lines (``mlff-train``, ``mlff-eval``, ``mlff-md``, ``mlff-export``) share: exit
codes, the one-paragraph error, the run-directory stamp, atomic JSON output and the metrics table.

Imports nothing heavy (no torch), so that ``--help`` and ``--cfg job`` stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Exit codes, documented in README.md ("Exit codes"); each names one outcome a script can act on.
EXIT_OK = 0
EXIT_ERROR = 2
"""Bad command line, config, data or checkpoint: reported in one paragraph before any work."""
EXIT_VERDICT_FAILED = 3
"""Everything ran and was written, but the result failed its check (e.g. a distilled student that fails the
stability gate): read the verdict in metrics.json."""
EXIT_UNSTABLE_MD = 4
"""Molecular dynamics became unstable (atoms too close, non-finite energy) and was stopped."""
# 130 / 143: stopped by SIGINT / SIGTERM after saving (128 + signal number).


class CLIError(Exception):
    """A problem with the command line or the files it names; reported in one paragraph, exit code 2."""


def fail(app: str, error: BaseException | str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``app: error: <message>`` on stderr (no traceback) and exit with ``code``.

    Hydra's wrapper around an error of our own raised while building a ``_target_`` (e.g. a data file that
    cannot be used) gives way to that error's one paragraph."""
    cause = error.__cause__ if isinstance(error, BaseException) else None
    if cause is not None and is_instantiation_error(error) and type(cause).__module__.startswith("mlff_distiller."):
        error = cause
    print(f"{app}: error: {error}", file=sys.stderr)
    raise SystemExit(code)


def is_instantiation_error(error: BaseException) -> bool:
    """Whether ``error`` is Hydra's wrapper for an exception raised while building a ``_target_``."""
    from hydra.errors import InstantiationException

    return isinstance(error, InstantiationException)


def run_stamp() -> str:
    """Date and time (with microseconds) naming a run directory. Under torchrun every process takes
    rank 0's, so that all of them share one run directory."""
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mlff_distiller.training import distributed

        distributed.init_from_env()
        stamp = distributed.broadcast_object(stamp)
    return stamp


OmegaConf.register_new_resolver("mlff_run_stamp", run_stamp, use_cache=True, replace=True)


def task_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_multirun() -> bool:
    """Whether the running Hydra job is one job of a sweep (``-m``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as sorted, indented JSON, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


UNITS = {
    "energy_mae_per_atom": "meV/atom",
    "energy_rmse_per_atom": "meV/atom",
    "force_mae": "meV/Å",
    "force_rmse": "meV/Å",
    "force_std": "meV/Å",
    "stress_mae": "meV/Å³",
    "hessian_mae": "meV/Å²",
    "teacher_per_s": "calls/s",
    "student_per_s": "calls/s",
    "speedup": "x",
    "energy_drift": "meV/atom/ps",
    "max_energy_deviation": "meV/atom",
    "min_distance": "Å",
    "min_distance_bound": "Å",
    "time_ps": "ps",
    "timestep_fs": "fs",
    "temperature_K": "K",
    "mean_temperature": "K",
    "ns_per_day": "ns/day",
    "atom_steps_per_s": "atom-steps/s",
    "wall_s": "s",
    "fresh_force_mae": "meV/Å",
    "force_mae_rel": "x std",
    "fresh_force_mae_rel": "x std",
    "teacher_calls": "calls",
    "seconds": "s",
}
"""Units of metrics, by the last part of their name that names a metric (``test/force_mae`` and
``test/force_mae/Cu`` -> ``force_mae``; parts that name a group, such as ``config_type=md_600K``, are skipped)."""


def unit_of(name: str) -> str:
    """The unit of metric ``name`` ("" when it has none or is unknown); names ending in ``_s`` are seconds."""
    for part in reversed(name.split("/")):
        if part in UNITS:
            return UNITS[part]
    leaf = name.rsplit("/", 1)[-1]
    return "s" if leaf.endswith("_s") else ""


def format_value(name: str, value: Any) -> str:
    """A metric value for a table: yes/NO for flags named ``stable``/``passed``, 4 significant digits else."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("stable", "passed"):
        return "yes" if value else "NO"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


FILE_ONLY_LOGGERS = ("mlff_distiller.training.trainer.epochs", "mlff_distiller.cli.table")
"""Loggers whose lines go to the run's log file only: the console shows the same figures as a table or as
compact epoch rows."""


def log_to_file_only() -> None:
    """Route :data:`FILE_ONLY_LOGGERS` to the log files of the running job (call it once per job: a sweep's
    jobs run in one process, each with its own file)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in FILE_ONLY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = list(files)
        logger.propagate = False


def print_metrics(results: dict[str, Any], title: str, console: Any | None = None) -> None:
    """``results`` as a rich table (metric, value, unit) on stderr, and each line in the log (the run's file
    only, after :func:`log_to_file_only`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name, value in results.items():
        table.add_row(name, format_value(name, value), unit_of(name))
    (console or Console(stderr=True)).print(table)
    table_log = logging.getLogger("mlff_distiller.cli.table")
    for name, value in results.items():
        table_log.info("%s = %s %s", name, format_value(name, value), unit_of(name))
