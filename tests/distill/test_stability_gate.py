"""The stability gate and the verdict, on calculators whose behaviour is known: EMT copper (smooth and
conservative: passes), a Morse potential whose minimum sits at 1 Å (the crystal collapses: fails on the
closest-approach bound), and EMT whose energy creeps up with every call (fails on the NVE drift)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential

from mlff_distiller.distill.gate import (
    GateConfig,
    advice,
    combine_trajectories,
    contact_bounds,
    gate_cell,
    largest_energy_jump,
    run_trajectories,
    sampled_bounds,
    stability_gate,
    verdict,
)
from mlff_distiller.md.driver import MDSettings, run_md
from mlff_distiller.md.stability import closest_contacts, closest_pairs

SHORT = {"nvt_ps": 0.2, "nve_ps": 0.2, "min_atoms": 32, "record_every": 5}


def copper():
    return bulk("Cu", "fcc", a=3.61, cubic=True)


class CreepingEMT(EMT):
    """EMT plus 0.2 meV/atom per call on the energy only: the forces stay EMT's, the energy is no longer theirs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.calls += 1
        self.results["energy"] += 2e-4 * self.calls * len(self.atoms)
        self.results["free_energy"] = self.results["energy"]


def test_emt_copper_passes_and_conserves_energy():
    metrics, reasons = stability_gate(EMT(), copper(), [300.0], GateConfig(**SHORT), min_distance_bound=1.5)
    assert reasons == [] and metrics["passed"] == 1.0
    assert metrics["num_atoms"] == 32 and metrics["temperature_K"] == 450.0
    assert metrics["nvt/time_ps"] == pytest.approx(0.2) and metrics["nve/time_ps"] == pytest.approx(0.2)
    assert abs(metrics["nve/energy_drift"]) < 0.5  # meV/atom/ps
    assert metrics["nvt/min_distance"] > 2.0 and 200 < metrics["nvt/mean_temperature"] < 700


def test_a_collapsing_potential_fails_on_the_closest_approach():
    collapsing = MorsePotential(epsilon=1.0, r0=1.0, rho0=3.0, rcut1=3.0, rcut2=4.0)
    metrics, reasons = stability_gate(collapsing, copper(), [300.0], GateConfig(**SHORT), min_distance_bound=1.5)
    assert metrics["passed"] == 0.0 and len(reasons) == 1
    assert reasons[0].startswith("NVT at 450 K (32 atoms) became unstable after")
    assert "closer than the bound of 1.500 Å" in reasons[0]
    assert metrics["nvt/time_ps"] < 0.2 and "nve/time_ps" not in metrics  # NVE is not run after a failed NVT


def test_more_trajectories_each_run_with_their_own_velocities_and_all_must_pass():
    one, _ = stability_gate(EMT(), copper(), [300.0], GateConfig(**SHORT), min_distance_bound=1.5)
    two, reasons = stability_gate(EMT(), copper(), [300.0], GateConfig(**SHORT, trajectories=2), 1.5)
    assert reasons == [] and two["passed"] == 1.0 and two["trajectories"] == two["trajectories_passed"] == 2.0
    # Trajectory 0 is the one-trajectory gate's, the next one another.
    assert two["nve/energy_drift"] == one["nve/energy_drift"] and one["trajectories"] == 1.0
    assert two["trajectory_1/nve/time_ps"] == pytest.approx(0.2)
    assert two["trajectory_1/nvt/mean_temperature"] != two["nvt/mean_temperature"]
    collapsing = MorsePotential(epsilon=1.0, r0=1.0, rho0=3.0, rcut1=3.0, rcut2=4.0)
    frames = []
    config = GateConfig(**SHORT, trajectories=3, failure_window_ps=0.02)
    metrics, reasons = stability_gate(collapsing, copper(), [300.0], config, 1.5, failure_frames=frames)
    # The first failure decides: no trajectory runs after it.
    assert (
        metrics["trajectories_passed"] == 0.0 and metrics["passed"] == 0.0 and "trajectory_1/nvt/time_ps" not in metrics
    )
    assert len(reasons) == 1 and reasons[0].startswith("trajectory 0: NVT at 450 K (32 atoms) became unstable")
    assert frames and {f.info["gate_trajectory"] for f in frames} == {0}
    with pytest.raises(ValueError, match=r"distill_report.gate.trajectories=0 is invalid"):
        GateConfig(trajectories=0)


def test_a_trajectory_is_the_same_whichever_call_runs_it_and_the_lowest_failure_gives_the_frames():
    config = GateConfig(**SHORT, trajectories=3)
    cell = gate_cell(copper(), config)
    in_turn, _ = stability_gate(EMT(), copper(), [300.0], config, 1.5)
    apart = run_trajectories(EMT(), cell, [300.0], config, 1.5, None, 0, [2]) + run_trajectories(
        EMT(), cell, [300.0], config, 1.5, None, 0, [1, 0]
    )
    combined, reasons, frames = combine_trajectories(apart, cell, [300.0], config, 1.5, None)
    assert reasons == [] and frames == [] and combined["passed"] == 1.0
    assert {k: v for k, v in combined.items() if not k.endswith(("ns_per_day", "seconds"))} == {
        k: v for k, v in in_turn.items() if not k.endswith(("ns_per_day", "seconds"))
    }
    assert run_trajectories(EMT(), cell, [300.0], config, 1.5, None, 0, [0, 1], stop=lambda: True) == []
    # A failure elsewhere during a trajectory stops it at the next check: dropped, neither passed nor failed.
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3

    assert run_trajectories(EMT(), cell, [300.0], config, 1.5, None, 0, [0, 1], stop=stop) == [] and len(asked) == 4
    settings = MDSettings(ensemble="nve", temperature_K=300.0, timestep_fs=2.0, steps=50, thermo_interval=5)
    checks = []
    cancelled = run_md(EMT(), cell, settings, cancel=lambda: checks.append(1) or len(checks) == 2)
    assert (
        cancelled.cancelled and cancelled.stable and cancelled.steps == 10 and "md/cancelled" not in cancelled.metrics()
    )
    # Two failed trajectories (from two processes): both reasons, the frames of the lower index only.
    collapsing = MorsePotential(epsilon=1.0, r0=1.0, rho0=3.0, rcut1=3.0, rcut2=4.0)
    failures = run_trajectories(collapsing, cell, [300.0], config, 1.5, None, 0, [2], keep_failure=True)
    failures += run_trajectories(collapsing, cell, [300.0], config, 1.5, None, 0, [1, 0], keep_failure=True)
    assert [o.index for o in failures] == [2, 1]  # each call stops at its first failure
    metrics, reasons, frames = combine_trajectories(failures, cell, [300.0], config, 1.5, None)
    assert [r.split(":")[0] for r in reasons] == ["trajectory 1", "trajectory 2"] and metrics["passed"] == 0.0
    assert frames and {f.info["gate_trajectory"] for f in frames} == {1} and metrics["trajectories_passed"] == 0.0


def test_a_failed_gate_keeps_its_sane_frames_of_the_window_before_the_failure():
    collapsing = MorsePotential(epsilon=1.0, r0=1.0, rho0=3.0, rcut1=3.0, rcut2=4.0)
    config = GateConfig(**SHORT, failure_window_ps=0.03)
    frames = []
    metrics, reasons = stability_gate(collapsing, copper(), [300.0], config, 1.5, failure_frames=frames)
    failed_at = metrics["nvt/time_ps"]
    # Every 5 steps of 2 fs (10 fs) in the last 30 fs, the equilibration half of NVT included, all above the bound.
    times = [frame.info["time_ps"] for frame in frames]
    assert frames and reasons and all(failed_at - 0.03 <= t < failed_at for t in times)
    assert np.allclose(np.diff(times), 0.01) and failed_at - times[-1] == pytest.approx(0.01)
    assert all(frame.info["gate_segment"] == "nvt" for frame in frames)
    assert all(min_distance_of(frame) > 1.5 for frame in frames)
    kept = []
    stability_gate(EMT(), copper(), [300.0], GateConfig(**SHORT), 1.5, failure_frames=kept)
    assert kept == []  # a gate that passes keeps nothing


def min_distance_of(atoms):
    distances = atoms.get_all_distances(mic=True)
    return distances[np.triu_indices(len(atoms), 1)].min()


def test_an_energy_that_is_not_the_forces_potential_fails_on_drift():
    metrics, reasons = stability_gate(CreepingEMT(), copper(), [300.0], GateConfig(**SHORT), min_distance_bound=1.5)
    # 0.2 meV/atom per call, one call per 2 fs step: about 100 meV/atom/ps.
    assert metrics["nve/energy_drift"] == pytest.approx(100.0, rel=0.1)
    assert reasons == [f"NVE energy drift {metrics['nve/energy_drift']:.3g} meV/atom/ps exceeds ±1"]


class JumpingEMT(EMT):
    """EMT whose energy steps up by 50 meV/atom from call ``at`` on (the forces stay EMT's): an NVE run fails on
    drift, and its largest energy jump is that step. Remembers the positions of every call and whether it had
    jumped."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, []

    def calculate(self, atoms=None, *args, **kwargs):
        super().calculate(atoms, *args, **kwargs)
        jumped = len(self.calls) >= self.at
        self.calls.append((self.atoms.positions.copy(), jumped))
        self.results["energy"] += 0.05 * len(self.atoms) * jumped
        self.results["free_energy"] = self.results["energy"]

    def had_jumped(self, frame):
        matches = [jumped for positions, jumped in self.calls if np.array_equal(positions, frame.positions)]
        assert len(matches) == 1
        return matches[0]


def test_a_drifting_nve_keeps_the_frames_before_its_largest_energy_jump():
    # 0.2 ps of NVT (about 100 calls), then the step after about 60 of the 100 NVE steps.
    calculator = JumpingEMT(at=160)
    config = GateConfig(**SHORT, failure_window_ps=0.05)
    frames = []
    metrics, reasons = stability_gate(calculator, copper(), [300.0], config, 1.5, failure_frames=frames)
    assert len(reasons) == 1 and reasons[0].startswith("NVE energy drift")
    assert all(f.info["gate_segment"] == "nve" and f.info["gate_failure"] == "drift" for f in frames)
    times = [f.info["time_ps"] for f in frames]
    assert len(frames) == 6 and np.allclose(np.diff(times), 0.01) and times[-1] < metrics["nve/time_ps"]
    # The window ends with the first recorded state after the step, every earlier one is from before it.
    assert calculator.had_jumped(frames[-1]) and not any(calculator.had_jumped(f) for f in frames[:-1])
    kept = []
    no_window = GateConfig(**SHORT, failure_window_ps=0.0)
    stability_gate(CreepingEMT(), copper(), [300.0], no_window, 1.5, failure_frames=kept)
    assert kept == []  # a window of 0 ps keeps nothing


def test_largest_energy_jump_is_the_row_that_ends_the_largest_change():
    thermo = {
        "time_ps": np.array([0.0, 0.1, 0.2, 0.3, 0.4]),
        "total_energy_eV": np.array([1.0, 1.1, np.nan, 0.5, 0.45]),
    }
    assert largest_energy_jump(thermo) == pytest.approx(0.3)  # 1.1 -> 0.5 across the NaN row
    assert math.isnan(largest_energy_jump({"time_ps": np.array([0.0]), "total_energy_eV": np.array([1.0])}))


def test_md_run_keeps_frames_after_equilibration_and_stops_with_a_reason():
    """The driver's frames (what exploration and fresh frames use) and its stop on the closest-approach bound."""
    settings = MDSettings("nvt", 300.0, 2.0, 40, thermo_interval=10, write_interval=10, equilibration_steps=10)
    run = run_md(EMT(), copper(), settings, keep_frames=True)
    assert run.stable and run.steps == 40 and [f.info["step"] for f in run.frames] == [20, 30, 40]
    assert run.time_ps == pytest.approx(0.08) and len(run.thermo["step"]) == 5
    squeezed = MDSettings("nve", 300.0, 2.0, 40, thermo_interval=10, write_interval=10, min_distance=2.6)
    run = run_md(EMT(), copper(), squeezed, keep_frames=True)
    assert not run.stable and run.steps == 0 and run.frames == [] and "2.6" in run.reason
    assert math.isnan(run.energy_drift)


def alloy():
    """Cu fcc with its first 8 atoms turned into gold, rattled: Au-Au contacts at ~2.55 Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.numbers[:8] = 79
    atoms.rattle(0.05, seed=2)
    return atoms


def test_closest_pairs_are_each_element_pairs_smallest_distance():
    atoms = alloy()
    found = closest_pairs(atoms)
    distances = atoms.get_all_distances(mic=True)
    np.fill_diagonal(distances, np.inf)
    gold = atoms.numbers == 79
    expected = {
        (29, 29): distances[np.ix_(~gold, ~gold)].min(),
        (29, 79): distances[np.ix_(~gold, gold)].min(),
        (79, 79): distances[np.ix_(gold, gold)].min(),
    }
    assert set(found) == set(expected)
    for pair, (distance, i, j) in found.items():
        assert distance == pytest.approx(expected[pair], abs=1e-9)
        assert distances[i, j] == pytest.approx(distance, abs=1e-9)
        assert sorted(atoms.numbers[[i, j]]) == list(pair)
    contacts = closest_contacts([atoms, copper()])
    assert list(contacts) == ["Cu-Cu", "Cu-Au", "Au-Au"]
    assert contacts["Cu-Cu"] == pytest.approx(min(expected[(29, 29)], 3.61 / 2**0.5), abs=1e-9)


def test_a_pair_bound_stops_a_run_the_global_bound_lets_through():
    settings = MDSettings("nve", 300.0, 2.0, 40, thermo_interval=10, write_interval=10, min_distance=1.0)
    assert run_md(EMT(), alloy(), settings).stable
    settings.pair_min_distance = {"Au-Au": 3.0, "Cu-Cu": 1.0}
    run = run_md(EMT(), alloy(), settings)
    assert not run.stable and run.steps == 0
    assert "(Au-Au) came" in run.reason and "closer than the Au-Au bound of 3.000 Å" in run.reason
    settings.pair_min_distance = {"Au-Xx": 3.0}
    with pytest.raises(ValueError, match="'Au-Xx' is not an element pair"):
        run_md(EMT(), alloy(), settings)
    settings.pair_min_distance = {"Au-Cu": -1.0}
    with pytest.raises(ValueError, match=r"pair_min_distance\['Au-Cu'\]=-1.0"):
        run_md(EMT(), alloy(), settings)


def test_the_gate_holds_each_pair_to_its_bound_from_the_labelled_data():
    atoms = alloy()
    bounds = contact_bounds([atoms], 0.6)
    assert bounds["Au-Au"] == pytest.approx(0.6 * closest_pairs(atoms)[(79, 79)][0])
    metrics, reasons = stability_gate(EMT(), atoms, [300.0], GateConfig(**SHORT), 1.0, pair_bounds=bounds)
    # NVT runs to its end (the strained alloy runs hot under EMT, which fails the gate, but not on a bound).
    assert metrics["nvt/time_ps"] == pytest.approx(0.2)
    assert not any("bound" in reason for reason in reasons)
    assert metrics["min_distance_bound/Au-Au"] == bounds["Au-Au"]
    # An Au-Au bound no fcc neighbour can meet: the gate fails on it, naming the pair.
    metrics, reasons = stability_gate(EMT(), atoms, [300.0], GateConfig(**SHORT), 1.0, pair_bounds={"Au-Au": 3.0})
    assert metrics["passed"] == 0.0 and "closer than the Au-Au bound of 3.000 Å" in reasons[0]


def test_contact_copies_do_not_loosen_the_bounds_of_the_sampled_set():
    """The sampler's contact copies push pairs inside the bounds on purpose: the bounds come from the rest."""
    from mlff_distiller.teachers.sampling import contact_copies

    sampled = [alloy()]
    pushed = contact_copies(sampled, 6, (0.3, 0.4), seed=0)
    bound, pairs = sampled_bounds(sampled + pushed, 0.6)
    assert (bound, pairs) == sampled_bounds(sampled, 0.6)
    assert pairs == contact_bounds(sampled, 0.6) and bound == pytest.approx(min(pairs.values()))
    assert min(contact_bounds(pushed, 0.6).values()) < 0.5 * min(pairs.values())  # they would have loosened them
    with pytest.raises(ValueError, match="every structure is train_only"):
        sampled_bounds(pushed, 0.6)


def test_verdict_fails_on_bounds_missing_and_non_finite_metrics():
    bounds = {"fresh/force_mae_rel": 0.05}
    assert verdict([], {"fresh/force_mae_rel": 0.03}, bounds) == ("pass", [])
    outcome, reasons = verdict([], {"fresh/force_mae_rel": 0.08}, bounds)
    assert outcome == "fail" and reasons == ["fresh/force_mae_rel = 0.08 exceeds its bound 0.05"]
    assert verdict([], {}, bounds)[1] == ["fresh/force_mae_rel was not measured (bound 0.05)"]
    assert verdict([], {"fresh/force_mae_rel": np.nan}, bounds)[0] == "fail"
    assert verdict(["NVT ... stopped"], {"fresh/force_mae_rel": 0.01}, bounds) == ("fail", ["NVT ... stopped"])
    assert "distill.rounds" in advice(["NVT at 450 K (108 atoms) stopped: atoms 1.2 Å apart"])
    assert "model.hidden" in advice(["fresh/force_mae_rel = 0.08 exceeds its bound 0.05"])


def test_gate_options_are_checked():
    with pytest.raises(ValueError, match=r"distill_report.gate.nvt_ps=-1"):
        GateConfig(nvt_ps=-1)
    with pytest.raises(ValueError, match="min_distance_fraction"):
        GateConfig(min_distance_fraction=1.5)
