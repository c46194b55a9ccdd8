"""``mlff-md``: molecular dynamics with a trained student in ASE, LAMMPS, i-PI, OpenMM or torch-sim.

It composes the config, checks every input (checkpoint, structure, elements, settings, engine package) before
any step, and hands over to :func:`mlff_distiller.md.driver.run_md`; it holds no MD logic. The run directory
gets ``trajectory.extxyz``, ``thermo.csv``, ``restart.traj`` and ``summary.json``. Exit codes: 0, 2 (bad input),
4 (the MD became unstable and was stopped).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mlff_distiller.cli import EXIT_UNSTABLE_MD, CLIError, fail, log_to_file_only, print_metrics, write_json

log = logging.getLogger("mlff_distiller.simulate")

SETTINGS = (
    "ensemble",
    "temperature_K",
    "timestep_fs",
    "steps",
    "friction_per_ps",
    "thermo_interval",
    "write_interval",
    "min_distance",
    "pair_min_distance",
    "seed",
    "keep_velocities",
)
DTYPES = ("float32", "float64")


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="md")
def main(cfg: DictConfig) -> None:
    try:
        summary = simulate(cfg)
    except CLIError as error:
        fail("mlff-md", error)
    if not summary.stable:
        fail("mlff-md", f"MD became unstable and was stopped: {summary.reason}.", EXIT_UNSTABLE_MD)


def simulate(cfg: DictConfig) -> Any:
    """Compose-then-run body of ``mlff-md``; returns the :class:`~mlff_distiller.md.driver.MDSummary`.

    Every problem with the inputs raises :class:`CLIError` before the first step."""
    from mlff_distiller.md.driver import run_md
    from mlff_distiller.md.engines import EngineUnavailableError
    from mlff_distiller.models.base import UnknownElementError
    from mlff_distiller.training.checkpoint import CheckpointError

    try:
        potential, atoms, settings, start_step = _prepare(cfg)
    except (ValueError, TypeError, EngineUnavailableError, UnknownElementError, CheckpointError) as error:
        raise CLIError(str(error)) from error
    output_dir = Path(cfg.paths.output_dir)
    log.info(
        "%s MD of %s (%d atoms) with %s in %s: %d steps of %g fs; output in %s",
        settings.ensemble.upper(),
        atoms.get_chemical_formula(),
        len(atoms),
        cfg.ckpt_path,
        cfg.engine.name,
        settings.steps - start_step,
        settings.timestep_fs,
        output_dir,
    )
    summary = run_md(
        potential,
        atoms,
        settings,
        engine=cfg.engine.name,
        output_dir=output_dir,
        start_step=start_step,
        engine_options=_plain(cfg.engine.options),
    )
    results = {k: v for k, v in summary.metrics().items() if not (isinstance(v, float) and math.isnan(v))}
    write_json(output_dir / "summary.json", {**results, "md/reason": summary.reason, "md/engine": summary.engine})
    log_to_file_only()
    print_metrics(results, f"mlff-md: {summary.engine}, {summary.ensemble.upper()}, {summary.num_atoms} atoms")
    return summary


def _prepare(cfg: DictConfig) -> tuple[Any, Any, Any, int]:
    """The student, the starting structure, the settings and the starting step, all checked."""
    from mlff_distiller.md.driver import MDSettings
    from mlff_distiller.md.engines import make_engine

    settings = MDSettings(**{name: _plain(cfg[name]) for name in SETTINGS})
    settings.validate()
    if cfg.dtype not in DTYPES:
        raise CLIError(f"dtype={cfg.dtype!r} is invalid; accepted: {', '.join(DTYPES)}.")
    make_engine(cfg.engine.name, **_plain(cfg.engine.options))  # a missing engine package stops us here
    atoms, start_step = _starting_structure(cfg)
    if start_step:
        settings.keep_velocities = True  # the restart's momenta are the state to continue from

    import torch

    from mlff_distiller.evaluation import load_student
    from mlff_distiller.md.potential import StudentPotential

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.exists():
        raise CLIError(f"ckpt_path={str(path)!r} does not exist; pass an mlff-train run directory or checkpoint file.")
    potential = StudentPotential(
        load_student(path, use_ema=cfg.use_ema).model, device=device, dtype=getattr(torch, cfg.dtype), skin=cfg.skin
    )
    potential.model.check_elements(atoms.numbers, where=f"structure={cfg.structure!r} ({atoms.get_chemical_formula()})")
    if len(atoms) < 2:
        raise CLIError(f"structure={cfg.structure!r} has {len(atoms)} atom(s); MD needs at least 2.")
    return potential, atoms, settings, start_step


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _starting_structure(cfg: DictConfig) -> tuple[Any, int]:
    """The structure to start from (read, repeated) and its step; a restart continues an earlier run."""
    import ase.io

    if cfg.restart:
        restart = Path(str(cfg.restart)).expanduser() / "restart.traj"
        if not restart.is_file():
            raise CLIError(f"restart={str(cfg.restart)!r} has no restart.traj; pass an earlier mlff-md run directory.")
        atoms = ase.io.read(restart)
        step = int(atoms.info.get("step", 0))
        if step >= cfg.steps:
            raise CLIError(f"restart={str(cfg.restart)!r} is at step {step}; ask for more steps (steps={cfg.steps}).")
        return atoms, step
    path = Path(str(cfg.structure)).expanduser()
    if not path.is_file():
        raise CLIError(f"structure={str(path)!r} does not exist; pass a file ASE can read (extxyz, cif, POSCAR, ...).")
    try:
        atoms = ase.io.read(path, index=cfg.structure_index)
    except Exception as error:
        raise CLIError(
            f"structure={str(path)!r} (structure_index={cfg.structure_index}) could not be read by ASE "
            f"({type(error).__name__}: {error})."
        ) from error
    if cfg.supercell is not None:
        repeats = list(_plain(cfg.supercell))
        if len(repeats) != 3 or not all(isinstance(n, int) and n >= 1 for n in repeats):
            raise CLIError(f"supercell={repeats} is invalid; give three integers >= 1, e.g. supercell=[2,2,2].")
        atoms = atoms.repeat(repeats)
    return atoms, 0


if __name__ == "__main__":
    main()
