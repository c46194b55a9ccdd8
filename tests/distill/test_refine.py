"""The refinement pass's pieces (:mod:`mlff_distiller.distill.refine`): which gate frames it labels, what the
budget pays for, its options, and the splits it trains on (the CLI test runs a whole pass)."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms

from mlff_distiller.distill.refine import RefineConfig, frames_within_budget, pick_frames, write_pass_sets
from mlff_distiller.distill.report import ReportConfig


def test_pick_frames_spreads_over_the_window_and_ends_at_the_failure():
    frames = list(range(50))
    assert pick_frames(frames, 5) == [0, 12, 24, 37, 49]
    assert pick_frames(frames, 1) == [49] and pick_frames(frames, 0) == []
    assert pick_frames(frames[:3], 16) == [0, 1, 2]


def test_the_budget_pays_for_what_is_left_in_whole_structures():
    assert frames_within_budget(16, None, 10**6, 1) == 16
    assert frames_within_budget(16, 500, 486, 1) == 14
    assert frames_within_budget(16, 500, 486, 3) == 4  # Hessian rows by finite differences: 3 calls each
    assert frames_within_budget(16, 500, 500, 1) == 0 and frames_within_budget(16, 500, 520, 1) == 0


def test_refine_options_are_checked_and_named():
    assert ReportConfig.from_dict({"refine": {"passes": 2}}).refine == RefineConfig(passes=2)
    with pytest.raises(ValueError, match=r"distill_report.refine.frames=0 is invalid: it must be an integer >= 1"):
        RefineConfig(frames=0)
    with pytest.raises(ValueError, match=r"distill_report.refine.passes=1.5 is invalid"):
        RefineConfig(passes=1.5)
    with pytest.raises(ValueError, match=r"Unknown distill_report.refine options \['pases'\]"):
        ReportConfig.from_dict({"refine": {"pases": 1}})


class _Split:
    """The two attributes of a data module that the pass reads."""

    def __init__(self, path, indices):
        self.split_files = {name: path for name in ("train", "val", "test")}
        self.split_indices = indices


def labelled(n, offset=0.0):
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for i in range(n):
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5 + offset + 0.01 * i, 0, 0]], cell=[8, 8, 8], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-float(i), forces=np.full((2, 3), 0.1 * i))
        atoms.info["index"] = i
        out.append(atoms)
    return out


def test_the_pass_adds_frames_to_the_training_split_alone(tmp_path):
    ase.io.write(tmp_path / "all.extxyz", labelled(10))
    ase.io.write(tmp_path / "gate.extxyz", labelled(3, offset=1.0))
    data = _Split(tmp_path / "all.extxyz", {"val": [7, 2], "test": [0, 5, 9], "train": [1, 3, 4, 6, 8]})
    sets = write_pass_sets(data, [tmp_path / "gate.extxyz"], tmp_path / "pass_1")
    read = {name: ase.io.read(path, ":") for name, path in sets.items()}
    assert [a.info["index"] for a in read["val"]] == [7, 2] and [a.info["index"] for a in read["test"]] == [0, 5, 9]
    assert [a.info["index"] for a in read["train"]] == [1, 3, 4, 6, 8, 0, 1, 2]
    assert read["train"][-1].get_potential_energy() == -2.0
    assert np.allclose(read["train"][-1].get_forces(), 0.2)


def test_a_second_pass_adds_only_its_own_frames(tmp_path):
    """After pass 1 the data module reads pass 1's files, whose training split holds pass 1's frames already; pass 2
    adds its own file alone, so no frame is trained on twice."""
    ase.io.write(tmp_path / "all.extxyz", labelled(6))
    ase.io.write(tmp_path / "gate_1.extxyz", labelled(2, offset=1.0))
    ase.io.write(tmp_path / "gate_2.extxyz", labelled(2, offset=2.0))
    first = write_pass_sets(
        _Split(tmp_path / "all.extxyz", {"val": [0], "test": [1], "train": [2, 3, 4, 5]}),
        [tmp_path / "gate_1.extxyz"],
        tmp_path / "pass_1",
    )
    after_first = _Split(first["train"], {"train": list(range(6)), "val": [0], "test": [0]})
    after_first.split_files = dict(first)
    second = write_pass_sets(after_first, [tmp_path / "gate_2.extxyz"], tmp_path / "pass_2")
    train = ase.io.read(second["train"], ":")
    distances = sorted(round(float(a.get_distance(0, 1)), 3) for a in train)
    assert distances == sorted(set(distances)) and len(train) == 4 + 2 + 2
