"""The active loop at toy size, EMT standing in for the teacher: two rounds with a committee of two under a tiny
teacher budget (respected, provenance recorded), and a run interrupted in the middle of a round (while labelling,
while training a committee member) that continues, on rerun, to exactly what an uninterrupted run gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ase.io
import pytest
from ase.calculators.emt import EMT

from mlff_distiller.distill.budget import teacher_calls
from mlff_distiller.distill.loop import ActiveLoop, ActiveLoopConfig, ExploreConfig, StudentRecipe
from mlff_distiller.losses.energy_force import EnergyForceLoss
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.teachers.sampling import SamplingConfig
from mlff_distiller.training import TrainingConfig

CUTOFF = 4.0
BUDGET = 55  # round 0: 15 labels + 25 calls of its teacher-driven MD + 9 placing the seed; round 1: 4; round 2: 2


class CountingEMT(EMT):
    """EMT that counts its calculations and, with ``fail_after``, dies (as a killed job would) after that many."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def calculate(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("teacher killed (simulated)")
        super().calculate(*args, **kwargs)
        self.calls += 1


def sampling(cache: Path) -> SamplingConfig:
    return SamplingConfig(
        system="Cu",
        system_options={"min_atoms": 8},
        cache_dir=str(cache),
        num_rattle=10,
        temperatures=[600.0],
        snapshots_per_run=4,
        equilibration_steps=4,
        snapshot_interval=5,
        progress=False,
    )


def recipe() -> StudentRecipe:
    return StudentRecipe(
        build_model=lambda statistics: SchNet(
            cutoff=CUTOFF, hidden=8, interactions=1, num_rbf=6, statistics=statistics
        ),
        build_loss=lambda: EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=0.0),
        training=TrainingConfig(
            batch_size=4, learning_rate=3e-3, lr_scheduler="none", log_interval=1000, ema_decay=0.9, device="cpu"
        ),
        data_options={"cutoff": CUTOFF, "num_val": 2, "batch_size": 4, "group_key": "md_run"},
        fingerprint={"test": "toy"},
    )


def loop_config(state: Path, budget: int) -> ActiveLoopConfig:
    return ActiveLoopConfig(
        rounds=2,
        committee=2,
        teacher_budget=budget,
        per_round=4,
        max_per_run=2,
        trust_low=0.0,  # an untrained committee agrees on almost everything; take any sane candidate
        fresh_per_round=2,
        epochs=2,
        warm_epochs=2,
        state_dir=str(state),
        progress=False,
        explore=ExploreConfig(
            variants=["plain", "large"],
            large_atoms=16,
            steps=[20, 30],  # round 1 explores 20 steps, round 2 (and any later) 30
            equilibration_steps=5,
            frame_interval=5,
            hot_factor=1.5,
        ),
    )


def run_loop(tmp: Path, state: str, teacher: CountingEMT, hook=None, budget: int = BUDGET):
    loop = ActiveLoop(loop_config(tmp / state, budget), sampling(tmp / "cache"), lambda: teacher, recipe(), hook)
    return loop.run()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    teacher = CountingEMT()
    return tmp, run_loop(tmp, "a", teacher), teacher


def test_budget_and_provenance(uninterrupted):
    tmp, result, teacher = uninterrupted
    round0 = ase.io.read(result.round0, ":")
    md_calls = 1 * (4 + 4 * 5 + 1)  # one teacher-driven run: equilibration + snapshots x interval + start
    seed_calls = 9  # the seed's EOS at the teacher's volume
    assert result.teacher_calls_round0 == len(round0) + md_calls + seed_calls
    assert result.teacher_calls_round0 == 49
    # Both rounds ran; the budget, not per_round (4), capped the second one, and was spent exactly.
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert [r["selected"] for r in result.rounds] == [r["teacher_calls"] for r in result.rounds] == [4, 2]
    assert result.teacher_calls_train == BUDGET
    # Every training label and fresh label the loop asked for is a teacher call it counted.
    assert teacher.calls == sum(r["teacher_calls"] + r["fresh_calls"] for r in result.rounds)
    assert result.teacher_calls_fresh == 2 * 2
    # The final set is round 0 plus each round's labels; the new structures say where they came from.
    final = ase.io.read(result.dataset, ":")
    labelled = [s for r in (1, 2) for s in ase.io.read(result.state_dir / f"round_{r:03d}" / "labelled.extxyz", ":")]
    assert len(final) == len(round0) + len(labelled) == len(round0) + sum(r["selected"] for r in result.rounds)
    for atoms in final[len(round0) :]:
        info = atoms.info
        assert info["round"] in (1, 2) and info["driver"] == "student" and info["temperature_K"] in (600.0, 900.0)
        assert info["score"] >= 0 and info["selection"] in ("committee", "unstable")
        assert info["provenance"].startswith(f"explore:round={info['round']}:run=") and "T=" in info["provenance"]
        assert teacher_calls(atoms) == 1
    # Fresh frames are at the target temperature, in the plain cell, and never in the training set.
    for r in (1, 2):
        fresh = ase.io.read(result.state_dir / f"round_{r:03d}" / "fresh.extxyz", ":")
        assert len(fresh) == 2 and all(a.info["temperature_K"] == 600.0 and a.info["variant"] == "plain" for a in fresh)
        assert not {a.info["provenance"] for a in fresh} & {a.info.get("provenance") for a in final}
        summary = result.rounds[r - 1]
        assert 0 < summary["fresh"]["force_mae"] and summary["fresh"]["force_mae_rel"] > 0
    # Each round's runs were as long as the schedule says (a frame every 5 steps after the 5 of equilibration).
    for r, steps in ((1, 20), (2, 30)):
        candidates = ase.io.read(result.state_dir / f"round_{r:03d}" / "candidates.extxyz", ":")
        by_run: dict[str, list[int]] = {}
        for atoms in candidates:
            by_run.setdefault(atoms.info["md_run"], []).append(int(atoms.info["md_snapshot"]))
        assert by_run and all(sorted(s) == list(range(10, steps + 1, 5)) for s in by_run.values()), (r, by_run)
    metrics = result.metrics()
    assert metrics["teacher_calls/train"] == result.teacher_calls_train and metrics["loop/rounds"] == 2


def test_a_budget_below_round_zero_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_budget=20 is below what round 0 may cost.*md_driver"):
        ActiveLoop(loop_config(tmp_path / "s", 20), sampling(tmp_path / "cache"), CountingEMT, recipe())
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s").exists()


def test_the_budget_bounds_the_final_set_before_any_work(tmp_path):
    # Round 0 holds at most 15 structures (1 seed, 10 rattled, 4 MD snapshots) and its MD and seed cost 34
    # calls; 2 rounds of 4 would make 23, but a budget of 55 pays for 21 structures at one call each.
    loop = ActiveLoop(loop_config(tmp_path / "s", BUDGET), sampling(tmp_path / "cache"), CountingEMT, recipe())
    assert loop.most_structures() == 21
    unbounded = dataclasses.replace(loop_config(tmp_path / "s", BUDGET), teacher_budget=None)
    assert ActiveLoop(unbounded, sampling(tmp_path / "cache"), CountingEMT, recipe()).most_structures() == 23
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s").exists()


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point."""


def test_killed_round_continues_to_the_uninterrupted_result(uninterrupted):
    tmp, reference, _ = uninterrupted
    # 1. The teacher dies while labelling round 1's selection (after the 2 fresh frames and 2 of 4 labels).
    with pytest.raises(RuntimeError, match="teacher killed"):
        run_loop(tmp, "b", CountingEMT(fail_after=4))
    round1 = tmp / "b" / "round_001"
    assert len(ase.io.read(round1 / "labelled.extxyz", ":")) == 2 and not (round1 / "summary.json").exists()

    # 2. Rerun: round 1 is finished with 2 more calls; a kill while training round 2's second member.
    def kill(stage: str) -> None:
        if stage == "round2/train/member1/epoch2":  # after the last epoch, before its checkpoint
            raise Killed(stage)

    teacher = CountingEMT()
    with pytest.raises(Killed):
        run_loop(tmp, "b", teacher, hook=kill)
    assert teacher.calls == 2 and (round1 / "summary.json").exists()
    assert (tmp / "b" / "round_002" / "member_1" / "last.pt").exists()  # epoch 1 of 2 was saved

    # 3. Rerun: it continues and ends where the uninterrupted run ended, structure for structure.
    resumed = run_loop(tmp, "b", CountingEMT())
    assert resumed.dataset.read_bytes() == reference.dataset.read_bytes()
    for r in (1, 2):
        for name in ("candidates.extxyz", "selected.extxyz", "labelled.extxyz", "fresh.extxyz"):
            assert (tmp / "b" / f"round_{r:03d}" / name).read_bytes() == (
                reference.state_dir / f"round_{r:03d}" / name
            ).read_bytes(), (r, name)
    strip = [{k: v for k, v in summary.items() if k != "seconds"} for summary in resumed.rounds]
    assert strip == [{k: v for k, v in summary.items() if k != "seconds"} for summary in reference.rounds]

    # 4. A finished loop is not recomputed: no teacher call, same result.
    idle = CountingEMT()
    again = run_loop(tmp, "b", idle)
    assert idle.calls == 0 and again.dataset == resumed.dataset and again.rounds == resumed.rounds


@pytest.mark.parametrize(
    "steps,message",
    [([], r"steps=\[\] is invalid"), ([20, 0], r"steps=\[20, 0\] is invalid"), ([20, 4], r"equilibration_steps=5")],
)
def test_a_bad_exploration_schedule_names_the_key(steps, message):
    with pytest.raises(ValueError, match=message):
        ExploreConfig(steps=steps, equilibration_steps=5)
    assert [ExploreConfig(steps=[20, 30], equilibration_steps=5).steps_in(r) for r in (1, 2, 3)] == [20, 30, 30]


def test_astray_frames_are_the_first_of_each_run_beyond_the_window():
    from ase import Atoms

    loop = object.__new__(ActiveLoop)  # only the selection is exercised: its config and force scale
    loop.force_scale = 1.0

    def pool() -> list[Atoms]:
        frames = []
        # Run a leaves the window [0.1, 1] at step 20, run b only at step 30, run c never does.
        runs = {"a": [0.5, 2.0, 3.0, 9.0], "b": [0.2, 0.3, 5.0, 0.4], "c": [0.6, 0.7, 0.8, 0.9]}
        for n, (run, scores) in enumerate(runs.items()):
            for k, score in enumerate(scores):
                atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.0 + 0.5 * n + 0.1 * k, 0, 0]])  # no duplicates
                atoms.info.update(md_run=run, md_snapshot=10 * (k + 1), score=score)
                frames.append(atoms)
        return frames

    def select(astray: int) -> list[tuple[str, int, str]]:
        loop.config = ActiveLoopConfig(trust_low=0.1, trust_high=1.0, astray_frames=astray, max_per_run=3)
        chosen, counts = loop._select(1, pool(), [], limit=8)
        assert counts == {"below_window": 0, "in_window": 8, "above_window": 4}
        return [(a.info["md_run"], a.info["md_snapshot"], a.info["selection"]) for a in chosen]

    # Without them: frames in the window only, the most uncertain first, at most 3 per run.
    in_window = [("c", 40), ("c", 30), ("c", 20), ("a", 10), ("b", 40), ("b", 20), ("b", 10)]
    assert select(0) == [(run, step, "committee") for run, step in in_window]
    # With 2: a's steps 20 and 30 and b's step 30 come first (not a's 40, the most uncertain); then the
    # window, within the cap of 3 per run and the limit of 8.
    astray = [("a", 20, "astray"), ("a", 30, "astray"), ("b", 30, "astray")]
    rest = [("c", 40), ("c", 30), ("c", 20), ("a", 10), ("b", 40)]
    assert select(2) == astray + [(run, step, "committee") for run, step in rest]
    with pytest.raises(ValueError, match="astray_frames=-1"):
        ActiveLoopConfig(astray_frames=-1)
    # Off, the option leaves the state key as it was before it existed (cached rounds stay valid).
    assert "astray_frames" not in ActiveLoopConfig().key_config()
    assert ActiveLoopConfig(astray_frames=2).key_config()["astray_frames"] == 2


def test_another_budget_adopts_the_rounds_it_shares_with_a_sibling_state(tmp_path):
    """The budget is in the state key, but a run at another budget takes over what a sibling computed for the
    rounds that trained on the same set: raising the budget labels only the difference, lowering it costs no
    teacher call, and either ends exactly where a run from scratch at that budget ends."""

    def run(budget: int, teacher: CountingEMT, state: str | None = None):
        config = dataclasses.replace(loop_config(tmp_path / (state or "unused"), budget), state_dir=state)
        return ActiveLoop(config, sampling(tmp_path / "cache"), lambda: teacher, recipe()).run()

    first = run(BUDGET, CountingEMT())  # round 2 stops at 2 labels: the budget
    assert [r["selected"] for r in first.rounds] == [4, 2]
    raised = CountingEMT()
    more = run(BUDGET + 5, raised)  # round 2 may take all 4 (per_round) now
    assert more.state_dir != first.state_dir and [r["selected"] for r in more.rounds] == [4, 4]
    assert raised.calls == 2  # the 2 labels beyond the first run's: committees, candidates, fresh frames adopted
    scratch = run(BUDGET + 5, CountingEMT(), state=str(tmp_path / "scratch"))  # no siblings with a given state_dir
    assert more.dataset.read_bytes() == scratch.dataset.read_bytes()
    for name in ("candidates.extxyz", "selected.extxyz", "labelled.extxyz", "fresh.extxyz"):
        assert (more.state_dir / "round_002" / name).read_bytes() == (
            scratch.state_dir / "round_002" / name
        ).read_bytes()
    lowered = CountingEMT()
    fewer = run(BUDGET - 1, lowered)  # round 2 keeps 1 of the 4 labels it adopts
    assert lowered.calls == 0 and [r["selected"] for r in fewer.rounds] == [4, 1]
    assert fewer.teacher_calls_train == BUDGET - 1
    # The final set is the first run's but its last structure, byte for byte.
    assert first.dataset.read_text().startswith(fewer.dataset.read_text())
    assert len(ase.io.read(fewer.dataset, ":")) == len(ase.io.read(first.dataset, ":")) - 1


def test_the_repulsion_option_off_leaves_the_loops_state_key_as_it_was():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import mlff_distiller.train  # noqa: F401  (registers the trainer schema)
    from mlff_distiller.distill.compose import loop_settings, model_key

    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=distill_chgnet_water"])
    _, committee = loop_settings(cfg)
    committee = OmegaConf.to_container(committee, resolve=True)
    assert committee["zbl"] is False
    # Rounds cached before the option existed were keyed by the same config without it: they stay valid.
    assert model_key(committee) == {k: v for k, v in committee.items() if k != "zbl"}
    assert model_key({**committee, "zbl": True})["zbl"] is True  # switched on, it is a different committee


def test_exploration_holds_each_element_pair_to_its_round_0_bound(tmp_path, monkeypatch):
    """A run whose atoms of one pair meet (in water: oxygens at 0.85 Å, inside the overall O-H bound) stops, so
    no such frame becomes a candidate; the driver's own test shows a pair bound stopping a run."""
    import mlff_distiller.md.driver as driver
    from mlff_distiller.distill.gate import contact_bounds
    from mlff_distiller.teachers.labelling import read_labelled

    seen = []
    original = driver.run_md

    def spy(model, atoms, settings, **kwargs):
        seen.append(settings.pair_min_distance)
        return original(model, atoms, settings, **kwargs)

    monkeypatch.setattr(driver, "run_md", spy)
    result = run_loop(tmp_path, "pairs", CountingEMT(), budget=BUDGET - 2)  # round 1 only
    bounds = contact_bounds(read_labelled(result.round0), 0.6)
    assert list(bounds) == ["Cu-Cu"] and seen
    assert all(pairs == bounds for pairs in seen)


def test_contact_copies_are_trained_on_but_set_no_bound_scale_or_exploration_start(tmp_path, monkeypatch):
    """Round 0's contact copies reach the committee's training split, but the loop's force scale and bounds come
    from the other structures, and no exploration run starts from a copy (its pushed pair would spring apart)."""
    import numpy as np

    import mlff_distiller.md.driver as driver
    from mlff_distiller.distill.gate import contact_bounds
    from mlff_distiller.teachers.labelling import read_labelled

    starts = []
    original = driver.run_md

    def spy(model, atoms, settings, **kwargs):
        starts.append((atoms.positions[:8].copy(), settings.pair_min_distance))
        return original(model, atoms, settings, **kwargs)

    monkeypatch.setattr(driver, "run_md", spy)
    contacts = dataclasses.replace(sampling(tmp_path / "cache"), num_contacts=30)  # 2 of 3 round-0 structures
    loop = ActiveLoop(loop_config(tmp_path / "state", BUDGET + 30 - 2), contacts, CountingEMT, recipe())
    result = loop.run()
    round0 = read_labelled(result.round0)
    copies = [atoms for atoms in round0 if atoms.info["config_type"] == "contact"]
    others = [atoms for atoms in round0 if atoms.info["config_type"] != "contact"]
    assert len(copies) == 30 and all(atoms.info["train_only"] for atoms in copies)
    assert min(contact_bounds(copies, 0.6).values()) < min(contact_bounds(others, 0.6).values())
    forces = np.concatenate([atoms.get_forces().reshape(-1) for atoms in others])
    assert result.force_scale == pytest.approx(float(forces.std()), rel=1e-12)
    assert starts and all(bounds == contact_bounds(others, 0.6) for _, bounds in starts)
    for positions, _ in starts:  # each run starts from a structure other than a copy (its first 8 atoms)
        assert not any(np.allclose(positions, atoms.positions, atol=1e-6) for atoms in copies)
        assert any(np.allclose(positions, atoms.positions, atol=1e-6) for atoms in others)
    # the copies are in the final set (never held out: the split trains on them)
    final = ase.io.read(result.dataset, ":")
    assert sum(bool(atoms.info.get("train_only")) for atoms in final) == 30
