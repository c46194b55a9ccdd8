"""Parallel labelling (worker processes, shards) writes what serial labelling writes, structure for
structure and byte for byte with EMT; interrupted runs resume to the same file; bad options are refused."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

from mlff_distiller.teachers import label_structures
from mlff_distiller.teachers.calculators import CalculatorSpec
from mlff_distiller.teachers.hessian import HessianMethodError
from mlff_distiller.teachers.labelling import (
    IncompleteShardsError,
    complete_frames,
    cost_path,
    labelling_cost,
    parts_directory,
    shard_bounds,
    shard_path,
)

LABELS = {"hessian_rows": 2, "site_energies": True, "chunk_size": 3, "progress": False}


@pytest.fixture(scope="module")
def structures(alloy_structures):
    return alloy_structures[:11]  # 4 chunks of 3 (the last one short)


@pytest.fixture(scope="module")
def serial(structures, tmp_path_factory):
    """The reference: one process, an EMT calculator object."""
    return label_structures(structures, EMT(), tmp_path_factory.mktemp("serial") / "labels.extxyz", **LABELS)


def _assert_same_labels(path, reference):
    frames, expected = ase.io.read(path, ":"), ase.io.read(reference, ":")
    assert len(frames) == len(expected)
    for frame, other in zip(frames, expected):
        np.testing.assert_array_equal(frame.numbers, other.numbers)
        np.testing.assert_array_equal(frame.positions, other.positions)
        np.testing.assert_array_equal(frame.cell.array, other.cell.array)
        assert frame.get_potential_energy() == other.get_potential_energy()
        np.testing.assert_array_equal(frame.get_forces(), other.get_forces())
        np.testing.assert_array_equal(frame.get_stress(), other.get_stress())
        np.testing.assert_array_equal(frame.arrays["hessian_rows"], other.arrays["hessian_rows"])
        np.testing.assert_array_equal(frame.arrays["site_energies"], other.arrays["site_energies"])
        assert set(frame.info) == set(other.info)  # provenance, config_type, row indices, method, calls
        for key, value in other.info.items():
            np.testing.assert_array_equal(frame.info[key], value)
    assert path.read_bytes() == reference.read_bytes()


def test_parallel_labelling_equals_serial_labelling(structures, serial, tmp_path):
    parallel = label_structures(structures, CalculatorSpec("emt"), tmp_path / "labels.extxyz", workers=2, **LABELS)
    _assert_same_labels(parallel, serial)
    assert not parts_directory(parallel).exists()
    cost, reference = labelling_cost(parallel, per_structure=True), labelling_cost(serial, per_structure=True)
    assert cost["calls_per_structure"] == reference["calls_per_structure"] == [1 + 2 * 2] * len(structures)
    assert cost["teacher_calls"] == 5 * len(structures) and cost["structures_without_cost"] == 0
    assert cost["teacher_cpu_seconds"] > 0
    frame = ase.io.read(parallel, 0)
    assert frame.info["hessian_method"] == "fd" and frame.info["teacher_calls"] == 5


def test_a_failed_or_killed_parallel_run_resumes_to_the_same_file(structures, serial, tmp_path):
    """A worker's failure stops the run after the chunks before it. Then the state a SIGKILL can leave on
    top: a file ending in a torn frame, a finished part further on, a torn temporary part and a part of
    another chunking. The resumed run uses the finished part (its teacher would fail on it), labels the
    rest, and writes the serial file."""
    output = tmp_path / "labels.extxyz"
    failing = CalculatorSpec("labelkit:FailingEMT", {"fail_x": float(structures[7].positions[0, 0])})
    with pytest.raises(RuntimeError, match="simulated failure in a worker"):
        label_structures(structures, failing, output, workers=2, **LABELS)
    assert complete_frames(output)[0] == 6  # the chunks before the failing one, appended in order
    assert len(cost_path(output).read_text().splitlines()) == 6

    data, ledger = serial.read_bytes(), cost_path(serial).read_text().splitlines()
    lines_per_frame = len(structures[0]) + 2
    assert all(len(atoms) == len(structures[0]) for atoms in structures)
    ends = [len(b"".join(data.splitlines(keepends=True)[: k * lines_per_frame])) for k in range(12)]
    output.write_bytes(data[: ends[4] + 500])  # as if killed while writing the fifth frame
    cost_path(output).write_text("\n".join(ledger[:5]) + "\n")  # costs are written before their frames
    parts = parts_directory(output)
    for stale in parts.iterdir():
        stale.unlink()
    (parts / "000000009-000000011.extxyz").write_bytes(data[ends[9] : ends[11]])
    (parts / "000000009-000000011.cost.json").write_text(json.dumps([json.loads(x) for x in ledger[9:11]]))
    (parts / "000000006-000000009.extxyz.123.tmp").write_bytes(data[ends[6] : ends[7]])
    (parts / "000000005-000000008.extxyz").write_bytes(data[ends[5] : ends[8]])
    dies_on_10 = CalculatorSpec("labelkit:FailingEMT", {"fail_x": float(structures[10].positions[0, 0])})
    label_structures(structures, dies_on_10, output, workers=2, **LABELS)
    _assert_same_labels(output, serial)
    assert not parts.exists()
    assert [json.loads(line)["index"] for line in cost_path(output).read_text().splitlines()] == list(range(11))


def test_shards_label_separately_and_the_last_one_merges(structures, serial, tmp_path):
    assert shard_bounds(11, 3) == [(0, 4), (4, 8), (8, 11)] and shard_bounds(2, 3)[2] == (2, 2)
    output = tmp_path / "labels.extxyz"
    written = [label_structures(structures, EMT(), output, num_shards=3, shard_index=i, **LABELS) for i in (2, 0)]
    assert written == [shard_path(output, 2, 3), shard_path(output, 0, 3)] and not output.exists()
    with pytest.raises(IncompleteShardsError, match=r"1 of 3 shards are unfinished: shard 1 \(labels.shard-0001"):
        label_structures(structures, EMT(), output, num_shards=3, **LABELS)  # merge only
    assert label_structures(structures, EMT(), output, num_shards=3, shard_index=1, **LABELS) == output
    _assert_same_labels(output, serial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.extxyz", "labels.extxyz.cost.jsonl"]
    assert labelling_cost(output)["teacher_calls"] == 5 * len(structures)


def test_bad_options_are_refused_before_any_work(structures, tmp_path):
    output = tmp_path / "labels.extxyz"
    with pytest.raises(TypeError, match="workers=2 needs the teacher as a CalculatorSpec"):
        label_structures(structures, EMT(), output, workers=2)
    with pytest.raises(HessianMethodError, match="hessian_method='finite' is invalid; accepted: fd, autograd, auto"):
        label_structures(structures, EMT(), output, hessian_rows=1, hessian_method="finite")
    with pytest.raises(HessianMethodError, match=r"teacher ase.calculators.emt.EMT has no autograd Hessian rows"):
        label_structures(structures, EMT(), output, hessian_rows=1, hessian_method="autograd")
    with pytest.raises(HessianMethodError, match="teacher 'emt' has no autograd Hessian rows .*chgnet, sevenn"):
        label_structures(structures, CalculatorSpec("emt"), output, hessian_rows=1, hessian_method="autograd")
    with pytest.raises(ValueError, match="shard_index=3 and num_shards=3"):
        label_structures(structures, EMT(), output, num_shards=3, shard_index=3)
    with pytest.raises(ValueError, match="workers=0"):
        label_structures(structures, EMT(), output, workers=0)
    assert list(tmp_path.iterdir()) == []


def test_the_dataset_builder_labels_in_workers_and_records_the_teacher_cost(tmp_path):
    from mlff_distiller.teachers import build_default_dataset

    options = {"num_structures": 6, "md_fraction": 0.0, "chunk_size": 2, "progress": False, "site_energies": True}
    serial = build_default_dataset(tmp_path / "serial", **options)
    parallel = build_default_dataset(tmp_path / "parallel", label_workers=2, **options)
    assert parallel.name == serial.name and parallel.read_bytes() == serial.read_bytes()  # same key, same file
    meta = json.loads(parallel.with_suffix(".json").read_text())
    assert meta["label_workers"] == 2 and meta["config"]["labels"] == ["energy", "forces", "stress", "site_energies"]
    cost = meta["teacher_cost"]
    assert cost["structures"] == 6 and cost["teacher_calls"] == 6 and cost["calls_per_structure"] == [1] * 6
    assert len(cost["cpu_seconds_per_structure"]) == 6 and cost["teacher_cpu_seconds"] > 0
    assert sorted(p.suffix for p in parallel.parent.iterdir() if p.suffix != ".lock") == [".extxyz", ".json"]


def test_the_generator_runs_its_md_in_workers_into_the_same_file(tmp_path):
    from mlff_distiller.teachers import build_default_dataset

    options = {
        "num_structures": 8,
        "snapshots_per_run": 2,
        "equilibration_steps": 5,
        "snapshot_interval": 2,
        "progress": False,
    }
    serial = build_default_dataset(tmp_path / "serial", **options)
    parallel = build_default_dataset(tmp_path / "parallel", workers=2, **options)
    assert parallel.name == serial.name and parallel.read_bytes() == serial.read_bytes()  # same key, same file
    frames = ase.io.read(parallel, index=":")
    assert sorted(atoms.info["md_run"] for atoms in frames if "md_run" in atoms.info) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        build_default_dataset(tmp_path / "none", workers=0, **options)
