"""Every engine runs the same MD as ASE: NVE trajectories agree with ASE's velocity Verlet (float64, same start),
Langevin NVT holds its target temperature within the statistical error of the run, and an exploding run is
stopped by the one stability check every engine goes through."""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest
import torch
from md_kit import MorseStudent, alloy, copper, student

from mlff_distiller.md.driver import MDSettings, run_md
from mlff_distiller.md.engines import ENGINES, engine_available
from mlff_distiller.md.potential import StudentPotential

torch.set_num_threads(1)

OTHER_ENGINES = [name for name in ENGINES if name != "ase"]


def require(engine: str) -> None:
    if not engine_available(engine):
        extra = ENGINES[engine][3]
        pytest.skip(f"engine {engine} is not installed here (pip install 'mlff-distiller[{extra}]')")


def nve(engine: str):
    settings = MDSettings(ensemble="nve", temperature_K=400.0, timestep_fs=1.0, steps=100, thermo_interval=10,
                          min_distance=0.0, seed=7)  # fmt: skip
    potential = StudentPotential(student("schnet"), dtype=torch.float64, skin=0.5)
    return run_md(potential, alloy(seed=5), settings, engine=engine)


@pytest.fixture(scope="module")
def ase_nve():
    return nve("ase")


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_nve_agrees_with_ase_velocity_verlet(engine, ase_nve):
    require(engine)
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    summary = nve(engine)
    # The engine left the process as it found it (i-PI takes SIGINT/SIGTERM while it runs).
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers
    reference = ase_nve
    assert summary.stable and reference.stable and summary.steps == 100
    moved = np.linalg.norm(reference.final.positions - alloy(seed=5).positions, axis=1)
    assert moved.mean() > 0.05  # the atoms went somewhere: the comparison means something
    deviation = np.abs(summary.final.positions - reference.final.positions).max()
    assert deviation < 1e-6, f"{engine}: positions differ from ASE's by {deviation:.2e} Å after 100 steps"
    total, expected = summary.thermo["total_energy_eV"], reference.thermo["total_energy_eV"]
    assert len(total) == len(expected) == 11
    assert np.abs(total - expected).max() / summary.num_atoms < 1e-6
    kinetic = reference.thermo["kinetic_energy_eV"]
    assert np.ptp(kinetic) / summary.num_atoms > 1e-3  # kinetic and potential energy traded places


@pytest.mark.parametrize("engine", list(ENGINES))
def test_nvt_holds_the_target_temperature(engine, request):
    """Mean of the instantaneous temperature after equilibration vs the target, within 4 standard errors from
    block averages (blocks of 200 fs, several times the time the kinetic energy of a 32-atom crystal takes to
    forget itself at a friction of 20/ps: shorter blocks are correlated and understate the error); its spread
    must match the canonical sqrt(2 / 3N). 2 ps by default (the standard error is ~2-3 % of the target), 12 ps
    with --md-long (~1 %). Every engine's thermostat is seeded, so the outcome is reproducible."""
    require(engine)
    target, rows_per_block, equilibration_rows = 300.0, 20, 24  # rows every 10 fs; 0.24 ps to equilibrate
    blocks_wanted = 60 if request.config.getoption("--md-long") else 10
    steps = 5 * (equilibration_rows + rows_per_block * blocks_wanted)
    settings = MDSettings(ensemble="nvt", temperature_K=target, timestep_fs=2.0, steps=steps, friction_per_ps=20.0,
                          thermo_interval=5, write_interval=steps, seed=11)  # fmt: skip
    potential = StudentPotential(MorseStudent(), dtype=torch.float64, skin=1.0)
    summary = run_md(potential, copper(2), settings, engine=engine)
    assert summary.stable, summary.reason
    temperatures = summary.thermo["temperature_K"][1 + equilibration_rows :]
    blocks = temperatures[: len(temperatures) // rows_per_block * rows_per_block].reshape(-1, rows_per_block)
    assert len(blocks) == blocks_wanted
    means = blocks.mean(axis=1)
    error = means.std(ddof=1) / math.sqrt(len(means))
    mean = temperatures.mean()
    print(f"\n{engine}: <T> = {mean:.1f} K ± {error:.1f} K (target {target} K)")
    assert error < 0.05 * target  # precise enough that a wrong thermostat would fail
    assert abs(mean - target) < 4 * error
    canonical_spread = target * math.sqrt(2 / (3 * summary.num_atoms))
    assert 0.6 < temperatures.std() / canonical_spread < 1.5


def test_an_exploding_run_is_stopped_with_the_reason():
    potential = StudentPotential(MorseStudent(), dtype=torch.float64)
    settings = MDSettings(ensemble="nve", temperature_K=3000.0, timestep_fs=25.0, steps=400, thermo_interval=5)
    summary = run_md(potential, copper(2), settings, engine="ase")
    assert not summary.stable
    assert "apart" in summary.reason or "energy became" in summary.reason or "non-finite" in summary.reason
    assert summary.steps < 400  # stopped early
    assert summary.min_distance < summary.min_distance_bound or not math.isfinite(
        summary.thermo["potential_energy_eV"][-1]
    )
