"""Teachers: ASE calculators that label structures with energies and forces.

``make_calculator("emt")`` is the offline default. The foundation-model teachers are optional packages;
asking for one that is not installed raises :class:`TeacherUnavailableError` with the install command.
Hydra builds a teacher with ``_target_: mlff_distiller.teachers.calculators.make_calculator`` and
``name: emt`` (further keys are passed to the calculator's constructor). :class:`CalculatorSpec` (a name and
constructor arguments) is a teacher that worker processes can each build for themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
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
    site_energies: bool = False
    """Whether its ASE calculator gives per-atom energies (the ASE property ``energies``)."""
    autograd_hessian: bool = False
    """Whether :mod:`.autograd` computes its Hessian rows by double backward."""


TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec(
            "emt",
            "ase",
            "pip install ase",
            "ASE effective-medium theory (Cu, Au, Ag, Ni, Pd, Pt, Al)",
            True,
            site_energies=True,
        ),
        TeacherSpec(
            "chgnet",
            "chgnet",
            "pip install chgnet",
            "CHGNet universal potential (weights in the wheel)",
            True,
            site_energies=True,
            autograd_hessian=True,
        ),
        TeacherSpec(
            "sevenn",
            "sevenn",
            "pip install sevenn",
            "SevenNet universal potential, '7net-0' (weights in the wheel)",
            True,
            site_energies=True,
            autograd_hessian=True,
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


@dataclass(frozen=True)
class CalculatorSpec:
    """A teacher by name and constructor arguments, so that each worker process builds its own calculator
    (calculators holding torch models or C handles need not pickle; this does).

    ``name`` is a teacher name :func:`make_calculator` knows, or ``"package.module:factory"`` for any
    importable callable that returns an ASE calculator; ``kwargs`` go to it.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """A new calculator."""
        if ":" in self.name:
            module, _, attribute = self.name.partition(":")
            try:
                factory = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as error:
                raise ValueError(
                    f"CalculatorSpec name {self.name!r}: cannot import {attribute!r} from {module!r} ({error})."
                ) from error
            return factory(**self.kwargs)
        return make_calculator(self.name, **self.kwargs)

    @property
    def teacher(self) -> TeacherSpec | None:
        """The built-in teacher it names, or None for a ``module:factory`` spec."""
        return None if ":" in self.name else TEACHERS[_canonical(self.name)]


class SiteEnergiesUnavailableError(ValueError):
    """Site energies were asked of a teacher that does not provide them."""


def calculator_class(calculator: Any) -> str:
    """``module.Class`` of a calculator (used to recognise teachers without importing their packages)."""
    return f"{type(calculator).__module__}.{type(calculator).__qualname__}"


def derives_from(calculator: Any, qualified_name: str) -> bool:
    """Whether ``calculator``'s class is, or derives from, ``qualified_name`` (``module.Class``)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == qualified_name for cls in type(calculator).__mro__)


def enable_site_energies(calculator: Any) -> None:
    """Make ``calculator`` compute per-atom energies (ASE's ``energies``), or raise
    :class:`SiteEnergiesUnavailableError` naming it and the option that asked.

    CHGNet computes them only with ``return_site_energies`` (switched on here); EMT and SevenNet always do.
    """
    if derives_from(calculator, "chgnet.model.dynamics.CHGNetCalculator"):
        calculator.return_site_energies = True
        return
    if "energies" not in getattr(calculator, "implemented_properties", ()):
        with_them = ", ".join(name for name, spec in TEACHERS.items() if spec.site_energies)
        raise SiteEnergiesUnavailableError(
            f"The teacher {calculator_class(calculator)} does not provide per-atom (site) energies (the ASE "
            f"property 'energies' is not among its implemented_properties "
            f"{list(getattr(calculator, 'implemented_properties', ()))}), but site energies were asked for "
            "(data.source.site_energies=true, or label_structures(site_energies=True)). Teachers with site "
            f"energies: {with_them}. Set site_energies to false for this teacher."
        )


def check_site_energies(spec: CalculatorSpec) -> None:
    """:func:`enable_site_energies`' verdict for a built-in teacher without building it (nothing for others)."""
    teacher = spec.teacher
    if teacher is not None and not teacher.site_energies:
        with_them = ", ".join(name for name, other in TEACHERS.items() if other.site_energies)
        raise SiteEnergiesUnavailableError(
            f"The teacher {teacher.name!r} does not provide per-atom (site) energies, but site energies were "
            "asked for (data.source.site_energies=true, or label_structures(site_energies=True)). Teachers "
            f"with site energies: {with_them}. Set site_energies to false for this teacher."
        )
