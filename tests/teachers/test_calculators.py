"""make_calculator: names, the offline EMT teacher, and clear errors for missing optional teachers."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from mlff_distiller.teachers import calculators
from mlff_distiller.teachers.calculators import TEACHERS, TeacherUnavailableError, make_calculator

OPTIONAL = [("chgnet", "chgnet", "pip install chgnet"), ("sevenn", "sevenn", "pip install sevenn"),
            ("mace_mp", "mace", "pip install mace-torch")]  # fmt: skip


def test_emt_teacher_computes_energy_and_forces():
    calculator = make_calculator("emt")
    assert isinstance(calculator, EMT)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    atoms.calc = calculator
    assert abs(atoms.get_potential_energy()) < 1.0
    assert atoms.get_forces().shape == (4, 3)
    assert isinstance(make_calculator(" EMT "), EMT)  # case and whitespace insensitive


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError) as info:
        make_calculator("lennard_jones")
    message = str(info.value)
    assert "lennard_jones" in message
    for name in ("emt", "chgnet", "sevenn", "mace_mp"):
        assert repr(name) in message
    assert set(TEACHERS) == {"emt", "chgnet", "sevenn", "mace_mp"}


def _pretend_missing(monkeypatch, package):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] == package else real(name, *args, **kwargs)

    monkeypatch.setattr(calculators.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(("name", "package", "install"), OPTIONAL)
def test_missing_package_names_install_command(monkeypatch, name, package, install):
    if importlib.util.find_spec(package) is not None:
        _pretend_missing(monkeypatch, package)  # installed here: simulate an environment without it
    with pytest.raises(TeacherUnavailableError) as info:
        make_calculator(name)
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert repr(name) in message and install in message
    if name == "mace_mp":
        assert "downloaded at first use" in message and "offline" in message
    assert not calculators.teacher_available(name)


def test_broken_install_is_reported(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        calculators.importlib.util,
        "find_spec",
        lambda name, *a, **k: object() if name == "chgnet" else real_find_spec(name, *a, **k),
    )

    def import_module(name, *args, **kwargs):
        if name.startswith("chgnet"):
            raise ImportError("libsomething.so: cannot open shared object file")
        return importlib.import_module(name, *args, **kwargs)

    monkeypatch.setattr(calculators.importlib, "import_module", import_module)
    with pytest.raises(TeacherUnavailableError, match=r"installed but importing .*libsomething.*pip install chgnet"):
        make_calculator("chgnet")


def test_hydra_instantiate_builds_the_teacher():
    from hydra.utils import instantiate

    calculator = instantiate({"_target_": "mlff_distiller.teachers.calculators.make_calculator", "name": "emt"})
    assert isinstance(calculator, EMT)


def test_package_import_is_light():
    heavy = "('ase', 'torch', 'chgnet')"
    code = f"import sys, mlff_distiller.teachers; print(sorted(m for m in {heavy} if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
