"""label_structures: round trip, resumability, torn frames, mismatches and non-finite labels."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

from mlff_distiller.teachers import LabelFileMismatchError, NonFiniteLabelError, label_structures, read_labelled
from mlff_distiller.teachers.labelling import complete_frames


def test_round_trip_matches_direct_emt(alloy_structures, tmp_path):
    path = label_structures(alloy_structures, EMT(), tmp_path / "labels.extxyz", chunk_size=5, progress=False)
    frames = ase.io.read(path, ":")
    assert len(frames) == len(alloy_structures)
    for frame, atoms in zip(frames, alloy_structures):
        reference = atoms.copy()
        reference.calc = EMT()
        assert frame.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(frame.get_forces(), reference.get_forces(), atol=1e-6)
        np.testing.assert_allclose(frame.positions, atoms.positions, atol=1e-6)
        np.testing.assert_array_equal(frame.numbers, atoms.numbers)
        assert frame.info["config_type"] == atoms.info["config_type"]
        assert frame.info["generator_index"] == atoms.info["generator_index"]
    assert all(atoms.calc is None for atoms in alloy_structures)  # inputs untouched
    assert len(read_labelled(path)) == len(alloy_structures)


def test_stale_labels_on_inputs_are_replaced(alloy_structures, tmp_path):
    structures = [atoms.copy() for atoms in alloy_structures[:3]]
    for atoms in structures:
        atoms.info["energy"] = 123.0
        atoms.arrays["forces"] = np.ones((len(atoms), 3))
    path = label_structures(structures, EMT(), tmp_path / "relabel.extxyz", progress=False)
    for frame, atoms in zip(read_labelled(path), structures):
        reference = atoms.copy()
        reference.calc = EMT()
        assert frame.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-6)


def test_interrupted_run_resumes_and_matches_uninterrupted(alloy_structures, counting_emt, tmp_path):
    reference = label_structures(alloy_structures, EMT(), tmp_path / "reference.extxyz", chunk_size=5, progress=False)

    output = tmp_path / "resumed.extxyz"
    dying = counting_emt(fail_after=13)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        label_structures(alloy_structures, dying, output, chunk_size=5, progress=False)
    assert complete_frames(output)[0] == 13  # finished chunks and the finished part of the failing one are kept

    resumed = counting_emt()
    label_structures(alloy_structures, resumed, output, chunk_size=5, progress=False)
    assert resumed.calls == len(alloy_structures) - 13
    assert output.read_bytes() == reference.read_bytes()

    again = counting_emt()
    label_structures(alloy_structures, again, output, chunk_size=5, progress=False)
    assert again.calls == 0


@pytest.mark.parametrize("cut", ["mid_line", "after_newline", "count_line_only"])
def test_torn_last_frame_is_recovered(alloy_structures, counting_emt, tmp_path, cut):
    structures = alloy_structures[:6]
    reference = label_structures(structures, EMT(), tmp_path / "reference.extxyz", progress=False)
    data = reference.read_bytes()
    last_frame_start = data.rindex(b"\n" + str(len(structures[-1])).encode() + b"\nLattice=") + 1
    if cut == "mid_line":
        torn = data[: len(data) - 40]
    elif cut == "after_newline":  # a cut exactly at a line end inside the frame
        torn = data[: data.rindex(b"\n", 0, len(data) - 100) + 1]
    else:
        torn = data[: last_frame_start + 3]
    assert len(torn) > last_frame_start
    output = tmp_path / "torn.extxyz"
    output.write_bytes(torn)
    assert complete_frames(output)[:2] == (5, last_frame_start)

    calculator = counting_emt()
    label_structures(structures, calculator, output, progress=False)
    assert calculator.calls == 1
    assert output.read_bytes() == data


def test_file_of_other_structures_is_refused(alloy_structures, counting_emt, tmp_path):
    output = label_structures(alloy_structures[:4], EMT(), tmp_path / "labels.extxyz", progress=False)
    before = output.read_bytes()
    shuffled = [alloy_structures[0], alloy_structures[2], alloy_structures[1], *alloy_structures[3:8]]
    calculator = counting_emt()
    with pytest.raises(LabelFileMismatchError, match=r"structure 1: .*delete it or choose another output"):
        label_structures(shuffled, calculator, output, progress=False)
    moved = [atoms.copy() for atoms in alloy_structures[:8]]
    moved[3].positions[5] += 0.01
    with pytest.raises(LabelFileMismatchError, match=r"structure 3: positions differ"):
        label_structures(moved, calculator, output, progress=False)
    with pytest.raises(LabelFileMismatchError, match="already holds 4 labelled structures but only 2"):
        label_structures(alloy_structures[:2], calculator, output, progress=False)
    assert calculator.calls == 0
    assert output.read_bytes() == before


def test_non_xyz_file_is_refused(alloy_structures, tmp_path):
    output = tmp_path / "notes.extxyz"
    output.write_text("these are my notes\nnot a structure\n")
    with pytest.raises(ValueError, match="should be an atom count"):
        label_structures(alloy_structures[:2], EMT(), output, progress=False)


@pytest.mark.parametrize(("field", "what"), [("nan_energy_at", "energy"), ("nan_forces_at", "forces")])
def test_non_finite_label_names_structure(alloy_structures, counting_emt, tmp_path, field, what):
    output = tmp_path / "labels.extxyz"
    calculator = counting_emt(**{field: 6})
    config_type = alloy_structures[6].info["config_type"]
    expected = rf"non-finite {what} for structure 6 \(config_type='{config_type}'\)"
    with pytest.raises(NonFiniteLabelError, match=expected):
        label_structures(alloy_structures[:10], calculator, output, chunk_size=4, progress=False)
    assert complete_frames(output)[0] == 6  # the good structures before it are kept


def test_empty_input_and_bad_chunk_size(tmp_path):
    path = label_structures([], EMT(), tmp_path / "empty.extxyz", progress=False)
    assert path.exists() and path.read_bytes() == b""
    with pytest.raises(ValueError, match="chunk_size"):
        label_structures([], EMT(), tmp_path / "x.extxyz", chunk_size=0)


def test_progress_bar_runs(alloy_structures, tmp_path):
    path = label_structures(alloy_structures[:3], EMT(), tmp_path / "bar.extxyz", chunk_size=2, progress=True)
    assert len(read_labelled(path)) == 3
