"""``mlff-export``: a trained student as one self-contained TorchScript file (see :mod:`mlff_distiller.md.export`).

Exit codes: 0 (written), 2 (bad input, before any work).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mlff_distiller.cli import CLIError, fail

log = logging.getLogger("mlff_distiller.export")

DTYPES = ("float32", "float64")


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except CLIError as error:
        fail("mlff-export", error)


def export(cfg: DictConfig) -> Path:
    """Compose-then-run body of ``mlff-export``; returns the file written."""
    if cfg.dtype not in DTYPES:
        raise CLIError(f"dtype={cfg.dtype!r} is invalid; accepted: {', '.join(DTYPES)}.")
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.exists():
        raise CLIError(f"ckpt_path={str(path)!r} does not exist; pass an mlff-train run directory or checkpoint file.")
    import torch

    from mlff_distiller.evaluation import load_student
    from mlff_distiller.md.export import export_student
    from mlff_distiller.training.checkpoint import CheckpointError

    try:
        model = load_student(path, use_ema=cfg.use_ema).model
    except CheckpointError as error:
        raise CLIError(str(error)) from error
    output = Path(str(cfg.output)).expanduser()
    metadata = export_student(model, output, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    log.info(
        "Wrote %s: %s, cutoff %g Å, elements %s, %s (load with torch.jit.load)",
        output,
        metadata["model"],
        metadata["cutoff"],
        metadata["elements"],
        metadata["dtype"],
    )
    print(output)
    return output


if __name__ == "__main__":
    main()
