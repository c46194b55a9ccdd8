"""The built-in Cu-Au dataset: deterministic generation, physical structures, cached and resumable builds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mlff_distiller.teachers import build_default_dataset, default_cache_dir, generate_alloy_structures, read_labelled
from mlff_distiller.teachers import calculators as calculators_module

SMALL = {"snapshots_per_run": 4, "equilibration_steps": 10, "snapshot_interval": 5}
"""Keeps the MD short in the build tests."""


def _min_distance(atoms):
    distances = atoms.get_all_distances(mic=True)
    np.fill_diagonal(distances, np.inf)
    return distances.min()


def test_same_seed_same_structures_other_seed_different(alloy_structures):
    again = generate_alloy_structures(24, seed=3, snapshots_per_run=4)
    other = generate_alloy_structures(24, seed=4, snapshots_per_run=4)
    for a, b in zip(alloy_structures, again):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
        assert a.info == b.info
    assert not any(np.allclose(a.positions, b.positions) for a, b in zip(alloy_structures, other))


def test_structures_are_physical_with_provenance(alloy_structures):
    assert len(alloy_structures) == 24
    kinds = {atoms.info["config_type"] for atoms in alloy_structures}
    assert kinds == {"rattle", "md_300K", "md_600K", "md_900K"}  # 3 MD runs of 4 snapshots
    assert sum(atoms.info["config_type"] == "rattle" for atoms in alloy_structures) == 12
    assert sorted(atoms.info["generator_index"] for atoms in alloy_structures) == list(range(24))
    assert [atoms.info["generator_index"] for atoms in alloy_structures] != list(range(24))  # shuffled
    for atoms in alloy_structures:
        assert len(atoms) == 32 and atoms.pbc.all()
        assert set(atoms.get_chemical_symbols()) <= {"Cu", "Au"}
        fraction = np.mean(atoms.numbers == 79)
        assert 0.0 <= fraction <= 0.5 and atoms.info["fraction_Au"] == pytest.approx(fraction)
        assert atoms.calc is None and not atoms.has("momenta")
        assert _min_distance(atoms) > 1.8
        # Vegard lattice constant (cubic 2x2x2 cell: 8 a^3) within the +-3% strain
        a_vegard = (1 - fraction) * 3.61 + fraction * 4.08
        assert atoms.get_volume() / 8 == pytest.approx(a_vegard**3, rel=0.1)
        scaled = atoms.get_scaled_positions(wrap=False)
        assert (scaled > -1e-9).all() and (scaled < 1 + 1e-9).all()  # wrapped into the cell


def test_generator_options(alloy_structures):
    rattled = generate_alloy_structures(6, seed=1, md_fraction=0.0, fraction_range=(0.0, 0.0), strain_max=0.0)
    assert all(atoms.info["config_type"] == "rattle" and (atoms.numbers == 29).all() for atoms in rattled)
    np.testing.assert_allclose(rattled[0].cell.lengths(), [7.22] * 3)
    hot = generate_alloy_structures(4, seed=1, md_fraction=1.0, temperatures=[1500], snapshots_per_run=2)
    assert [atoms.info["config_type"] for atoms in hot] == ["md_1500K"] * 4
    assert sorted(atoms.info["md_run"] for atoms in hot) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="elements"):
        generate_alloy_structures(2, elements=("Cu", "Xx"))
    assert generate_alloy_structures(0) == []


def _counting_teacher(monkeypatch, counting_emt, **kwargs):
    made = []

    def make_calculator(name, **teacher_kwargs):
        assert name == "emt"
        made.append(counting_emt(**kwargs))
        return made[-1]

    monkeypatch.setattr(calculators_module, "make_calculator", make_calculator)
    return made


def test_build_caches_and_second_call_does_not_label(tmp_path, monkeypatch, counting_emt, capsys):
    made = _counting_teacher(monkeypatch, counting_emt)
    path = build_default_dataset(tmp_path, num_structures=20, seed=1, progress=False, **SMALL)
    assert len(made) == 1 and made[0].calls == 20
    assert path.parent == tmp_path and path.name.startswith("cuau_emt_") and path.suffix == ".extxyz"
    frames = read_labelled(path)
    assert len(frames) == 20 and all(np.isfinite(f.get_forces()).all() for f in frames)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["num_structures"] == 20 and meta["config"]["teacher"] == "emt"
    assert meta["config"]["generator"]["snapshots_per_run"] == 4 and meta["bytes"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        path.name,
        path.with_suffix(".json").name,
    ]
    mtime = path.stat().st_mtime_ns

    again = build_default_dataset(tmp_path, num_structures=20, seed=1, progress=True, **SMALL)
    assert again == path and len(made) == 1 and path.stat().st_mtime_ns == mtime
    assert str(path) in capsys.readouterr().err

    other = build_default_dataset(tmp_path, num_structures=20, seed=2, progress=False, **SMALL)
    assert other != path and len(made) == 2


def test_interrupted_build_never_looks_complete_and_resumes(tmp_path, monkeypatch, counting_emt):
    made = _counting_teacher(monkeypatch, counting_emt, fail_after=7)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build_default_dataset(tmp_path / "a", num_structures=16, seed=5, chunk_size=3, progress=False, **SMALL)
    assert not list((tmp_path / "a").glob("*[0-9a-f].extxyz"))  # no final-looking file
    assert len(list((tmp_path / "a").glob("*.partial.extxyz"))) == 1

    made = _counting_teacher(monkeypatch, counting_emt)
    path = build_default_dataset(tmp_path / "a", num_structures=16, seed=5, chunk_size=3, progress=False, **SMALL)
    assert made[0].calls == 16 - 7
    assert not list((tmp_path / "a").glob("*.partial.extxyz"))

    fresh = build_default_dataset(tmp_path / "b", num_structures=16, seed=5, chunk_size=3, progress=False, **SMALL)
    assert fresh.name == path.name and fresh.read_bytes() == path.read_bytes()


def test_truncated_cache_is_rebuilt(tmp_path, monkeypatch, counting_emt):
    made = _counting_teacher(monkeypatch, counting_emt)
    path = build_default_dataset(tmp_path, num_structures=8, seed=1, progress=False, **SMALL)
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    assert build_default_dataset(tmp_path, num_structures=8, seed=1, progress=False, **SMALL) == path
    assert len(made) == 2 and path.read_bytes() == good


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "mlff_distiller" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mlff_distiller" / "datasets"


def test_unknown_generator_option_is_refused(tmp_path):
    with pytest.raises(TypeError, match="rattle_sdt"):
        build_default_dataset(tmp_path, num_structures=2, rattle_sdt=0.1)


def test_concurrent_builders_build_once(tmp_path):
    code = (
        "import sys; from mlff_distiller.teachers import build_default_dataset; "
        "print(build_default_dataset(sys.argv[1], num_structures=8, seed=9, snapshots_per_run=4, "
        "equilibration_steps=10, snapshot_interval=5, progress=True))"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [run.communicate(timeout=60) for run in runs]
    assert all(run.returncode == 0 for run in runs), results
    paths = {out.decode().strip() for out, _ in results}
    assert len(paths) == 1
    messages = "".join(err.decode() for _, err in results)
    assert messages.count("Building dataset") == 1 and messages.count("Using cached dataset") == 1
    assert len(read_labelled(paths.pop())) == 8
