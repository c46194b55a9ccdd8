"""``mlff-label``: label a file of structures with a teacher. The Hydra command line composes the teacher
group and the labelling options and hands them to :func:`~mlff_distiller.teachers.labelling.label_structures`.

One process, ``workers=N`` local processes, or one shard per job: ``num_shards=K shard_index=I`` labels
the I-th contiguous shard into its own resumable file, and the job that completes the last shard merges
them into ``output`` (a Hydra multirun over ``shard_index`` is then a set of cluster jobs). Under
``torchrun`` each process labels the shard of its rank (``num_shards`` = world size) the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("mlff_distiller.label")


class LabelCLIError(Exception):
    """A problem with the command line or the files it names; reported in one paragraph, exit code 2."""


def shard_from_environment(num_shards: int, shard_index: int | None) -> tuple[int, int | None]:
    """``(num_shards, shard_index)``: as given, or under a launcher that starts several processes
    (``WORLD_SIZE`` > 1, e.g. torchrun) the process's rank of the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return num_shards, shard_index
    if shard_index is not None or num_shards not in (1, world):
        raise LabelCLIError(
            f"Under torchrun (WORLD_SIZE={world}) each process labels the shard of its rank; leave "
            f"shard_index (got {shard_index}) and num_shards (got {num_shards}) unset."
        )
    return world, int(os.environ.get("RANK", "0"))


def label(cfg: DictConfig) -> Path:
    """Compose-then-run body of ``mlff-label``; returns the file written (a shard, or the merged output)."""
    import ase.io

    from mlff_distiller.teachers.calculators import CalculatorSpec
    from mlff_distiller.teachers.labelling import label_structures, labelling_cost

    source = Path(cfg.input)
    if not source.is_file():
        raise LabelCLIError(f"input={str(source)!r} does not exist (an ASE-readable file of structures to label).")
    try:
        structures = ase.io.read(source, index=":")
    except Exception as error:
        raise LabelCLIError(
            f"input={str(source)!r} could not be read by ASE ({type(error).__name__}: {error})."
        ) from error
    num_shards, shard_index = shard_from_environment(int(cfg.num_shards), cfg.shard_index)
    teacher = CalculatorSpec(str(cfg.teacher.name), dict(cfg.teacher.kwargs or {}))
    written = label_structures(
        structures,
        teacher,
        cfg.output,
        chunk_size=int(cfg.chunk_size),
        progress=bool(cfg.progress),
        hessian_rows=int(cfg.hessian_rows),
        hessian_delta=float(cfg.hessian_delta),
        hessian_seed=int(cfg.seed),
        hessian_method=str(cfg.hessian_method),
        site_energies=bool(cfg.site_energies),
        workers=int(cfg.workers),
        num_shards=num_shards,
        shard_index=shard_index,
    )
    cost = labelling_cost(written)
    log.info("Labelled %s: %s", written, json.dumps(cost))
    return written


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="label")
def main(cfg: DictConfig) -> None:
    """Label ``cfg.input`` into ``cfg.output`` (see :func:`label`)."""
    from mlff_distiller.teachers.calculators import SiteEnergiesUnavailableError, TeacherUnavailableError
    from mlff_distiller.teachers.hessian import HessianMethodError
    from mlff_distiller.teachers.labelling import IncompleteShardsError, LabelFileMismatchError, NonFiniteLabelError

    known = (
        LabelCLIError,
        SiteEnergiesUnavailableError,
        TeacherUnavailableError,
        HessianMethodError,
        IncompleteShardsError,
        LabelFileMismatchError,
        NonFiniteLabelError,
    )
    try:
        label(cfg)
    except known as error:
        print(f"mlff-label: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
