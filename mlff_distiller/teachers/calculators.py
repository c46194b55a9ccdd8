"""Teachers: ASE calculators that label structures with energies and forces.

``make_calculator("emt")`` is the offline default. The foundation-model teachers are optional packages;
asking for one that is not installed raises :class:`TeacherUnavailableError` with the install command.
Hydra builds a teacher with ``_target_: mlff_distiller.teachers.calculators.make_calculator`` and
``name: emt`` (further keys are passed to the calculator's constructor).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class TeacherUnavailableError(ImportError):
    """The package a teacher needs is missing or cannot be imported."""


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    package: str
    """Top-level module that must be importable."""
    install: str
    """Shell command that installs it."""
    description: str
    offline: bool
    """Whether it works without network access (weights ship with the package)."""


TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec("emt", "ase", "pip install ase", "ASE effective-medium theory (Cu, Au, Ag, Ni, Pd, Pt, Al)", True),
        TeacherSpec(
            "chgnet", "chgnet", "pip install chgnet", "CHGNet universal potential (weights in the wheel)", True
        ),
        TeacherSpec(
            "sevenn",
            "sevenn",
            "pip install sevenn",
            "SevenNet universal potential, '7net-0' (weights in the wheel)",
            True,
        ),
        TeacherSpec(
            "mace_mp",
            "mace",
            "pip install mace-torch",
            "MACE-MP foundation model; its weights are downloaded at first use, so it does not work offline",
            False,
        ),
    )
}
"""Accepted teacher names."""

_ALIASES = {"mace": "mace_mp", "7net": "sevenn", "sevennet": "sevenn"}


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in TEACHERS:
        accepted = ", ".join(repr(n) for n in TEACHERS)
        raise ValueError(f"Unknown teacher {name!r}; accepted names: {accepted}.")
    return key


def _import(spec: TeacherSpec, module: str) -> Any:
    """Import ``module`` for ``spec``, turning a failure into :class:`TeacherUnavailableError`."""
    offline_note = "" if spec.offline else f" Note: {spec.description}."
    if importlib.util.find_spec(spec.package) is None:
        raise TeacherUnavailableError(
            f"Teacher {spec.name!r} needs the package {spec.package!r}, which is not installed. "
            f"Install it with: {spec.install}.{offline_note}"
        )
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TeacherUnavailableError(
            f"Teacher {spec.name!r}: the package {spec.package!r} is installed but importing {module!r} failed "
            f"({error}). Reinstall it with: {spec.install}.{offline_note}"
        ) from error


def _emt(spec: TeacherSpec, kwargs: dict[str, Any]) -> Any:
    return _import(spec, "ase.calculators.emt").EMT(**kwargs)


def _chgnet(spec: TeacherSpec, kwargs: dict[str, Any]) -> Any:
    return _import(spec, "chgnet.model.dynamics").CHGNetCalculator(**kwargs)


def _sevenn(spec: TeacherSpec, kwargs: dict[str, Any]) -> Any:
    model = kwargs.pop("model", "7net-0")
    return _import(spec, "sevenn.calculator").SevenNetCalculator(model, **kwargs)


def _mace_mp(spec: TeacherSpec, kwargs: dict[str, Any]) -> Any:
    module = _import(spec, "mace.calculators")
    log.warning("mace_mp downloads its weights at first use; it fails without network access unless they are cached.")
    return module.mace_mp(**kwargs)


_BUILDERS: dict[str, Callable[[TeacherSpec, dict[str, Any]], Any]] = {
    "emt": _emt,
    "chgnet": _chgnet,
    "sevenn": _sevenn,
    "mace_mp": _mace_mp,
}


def make_calculator(name: str, **kwargs: Any) -> Any:
    """An ASE calculator for the teacher ``name``; ``kwargs`` go to its constructor.

    Names (case-insensitive): ``"emt"`` (ASE EMT, offline), ``"chgnet"`` (``CHGNetCalculator``),
    ``"sevenn"`` (``SevenNetCalculator('7net-0')``; pass ``model=`` for another), ``"mace_mp"``
    (``mace.calculators.mace_mp``; downloads its weights at first use, so not offline).

    Raises ``ValueError`` for an unknown name and :class:`TeacherUnavailableError` (an ``ImportError``)
    when the teacher's package is missing, naming the install command.
    """
    key = _canonical(name)
    return _BUILDERS[key](TEACHERS[key], dict(kwargs))


def teacher_available(name: str) -> bool:
    """Whether the package behind teacher ``name`` is installed (does not import it)."""
    return importlib.util.find_spec(TEACHERS[_canonical(name)].package) is not None


def require_teacher(name: str) -> None:
    """Raise :class:`TeacherUnavailableError` naming the install command when teacher ``name``'s package
    is missing (checked before any work starts; nothing is imported)."""
    spec = TEACHERS[_canonical(name)]
    if importlib.util.find_spec(spec.package) is None:
        raise TeacherUnavailableError(
            f"Teacher {spec.name!r} needs the package {spec.package!r}, which is not installed. Install it with: "
            f'{spec.install}   (or: pip install "mlff-distiller[{spec.name}]" where that extra exists).'
        )
