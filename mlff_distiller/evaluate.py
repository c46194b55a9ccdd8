"""``mlff-eval``: evaluate a trained student on any labelled file, as a Hydra command line.

It checks the config, rebuilds the student from its checkpoint, refuses elements it was not trained on, and
hands over to :func:`mlff_distiller.evaluation.evaluate_structures`; it writes ``metrics.json``,
``predictions.extxyz`` and ``parity.png`` into its own run directory (``outputs/eval/<date>/<time>/``).
Heavy imports happen inside the task, so that ``--help`` and ``--cfg job`` stay fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mlff_distiller.cli import CLIError, fail, log_to_file_only, print_metrics, write_json

log = logging.getLogger("mlff_distiller.evaluate")

DTYPES = ("float32", "float64")


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Evaluate ``ckpt_path`` on ``data.path`` with the composed config."""
    try:
        evaluate(cfg)
    except Exception as error:
        from mlff_distiller.data.dataset import DataError
        from mlff_distiller.models.base import UnknownElementError
        from mlff_distiller.training import CheckpointError
        from mlff_distiller.training.config import ConfigError

        if isinstance(error, (CLIError, ConfigError, DataError, UnknownElementError, CheckpointError)):
            fail("mlff-eval", error)
        raise


def check_config(cfg: DictConfig) -> None:
    """Every option checked before anything is read: an error names the key, the value and what is accepted."""
    for key, what in (("ckpt_path", "a run directory of mlff-train or a checkpoint file"), ("data.path", "a file")):
        if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) in (None, ""):
            raise CLIError(
                f"{key} is required: give {what}, e.g. mlff-eval ckpt_path=outputs/<date>/<time> data.path=test.extxyz."
            )
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
        raise CLIError(f"batch_size={cfg.batch_size!r} is invalid: it must be an integer >= 1.")
    if cfg.dtype not in DTYPES:
        raise CLIError(f"dtype={cfg.dtype!r} is invalid; accepted: {', '.join(DTYPES)}.")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The body of ``mlff-eval``: returns what it writes to ``metrics.json``."""
    check_config(cfg)
    import torch

    from mlff_distiller.data.dataset import read_labelled_structures
    from mlff_distiller.evaluation import check_trained_elements, evaluate_structures, load_student
    from mlff_distiller.plots import parity_plot
    from mlff_distiller.training.distributed import resolve_device

    device = resolve_device(str(cfg.device))
    data_path = Path(str(cfg.data.path)).expanduser()
    student = load_student(str(cfg.ckpt_path), use_ema=cfg.use_ema)
    structures = read_labelled_structures(
        data_path, cfg.data.energy_key, cfg.data.forces_key, stress_key=cfg.data.stress_key
    )
    source = repr(str(data_path))
    check_trained_elements(student.model, structures, source)  # before any work
    log.info(
        "Evaluating %s (%s weights) on %d structures of %s, on %s",
        student.path,
        "EMA" if student.ema else "plain",
        len(structures),
        data_path,
        device,
    )
    result = evaluate_structures(
        student.model,
        structures,
        batch_size=cfg.batch_size,
        metric_groups_key=cfg.data.metric_groups_key,
        device=device,
        dtype=getattr(torch, cfg.dtype),
        source=source,
    )
    output_dir = Path(cfg.paths.output_dir)
    metrics = {f"eval/{name}": value for name, value in result.metrics.items()}
    log_to_file_only()
    print_metrics(metrics, f"{data_path.name}: {len(structures)} structures, {student.path}")
    record: dict[str, Any] = {
        **metrics,
        "checkpoint": str(student.path.resolve()),
        "ema_weights": student.ema,
        "data_path": str(data_path.resolve()),
    }
    write_json(output_dir / "metrics.json", record)
    if cfg.predictions:
        log.info("Predictions: %s", result.write_predictions(output_dir / "predictions.extxyz"))
    if cfg.parity_plot:
        title = f"{student.path.name} on {data_path.name} ({len(structures)} structures)"
        plot = parity_plot(result.parity, output_dir / "parity.png", title, "label", "student")
        if plot is not None:
            log.info("Parity plot: %s", plot)
    log.info("Outputs in %s", output_dir)
    return record


if __name__ == "__main__":
    main()
