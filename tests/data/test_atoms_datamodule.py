"""`AtomsDataModule`: seeded splits, caps, path vs source, loaders, the statistics it hands the model."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from datakit import write_emt_file

from mlff_distiller.data import keys
from mlff_distiller.data.batch import AtomsBatch
from mlff_distiller.data.dataset import DataError
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.data.statistics import compute_statistics
from mlff_distiller.training.trainer import infer_batch_size

NUM = 24
CUTOFF = 4.0


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("module_data") / "cells.extxyz"
    labels = write_emt_file(path, NUM)
    return path, labels


def _module(path, **kwargs):
    options = {"cutoff": CUTOFF, "num_val": 5, "num_test": 4, "batch_size": 4, "seed": 0, **kwargs}
    return AtomsDataModule(path=str(path), **options)


def test_splits_are_disjoint_cover_the_file_and_have_the_right_sizes(labelled_file):
    path, labels = labelled_file
    data = _module(path)
    split = data.split_indices
    assert [len(split[s]) for s in ("train", "val", "test")] == [NUM - 9, 5, 4]
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(NUM))
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [NUM - 9, 5, 4]
    # Each split holds the structures its indices name (checked through the labels).
    for name in ("train", "val", "test"):
        for index, graph in zip(split[name], data.datasets[name].graphs):
            energy, forces = labels[index]
            assert float(graph[keys.ENERGY]) == pytest.approx(energy, rel=1e-6)
            np.testing.assert_allclose(graph[keys.FORCES].numpy(), forces, atol=1e-5)


def test_same_seed_same_split_other_seed_other_split(labelled_file):
    path, _ = labelled_file
    first, again, other = _module(path, seed=3), _module(path, seed=3), _module(path, seed=4)
    assert first.split_indices == again.split_indices
    assert first.split_indices["val"] != other.split_indices["val"]
    assert first.split_indices["train"] != other.split_indices["train"]
    assert sorted(first.split_indices["val"]) != list(range(5))  # a random split, not the file order


def test_num_train_caps_the_training_split_only(labelled_file):
    path, _ = labelled_file
    full, capped = _module(path), _module(path, num_train=6)
    assert len(capped.split_indices["train"]) == 6
    assert capped.split_indices["val"] == full.split_indices["val"]
    assert capped.split_indices["test"] == full.split_indices["test"]
    assert set(capped.split_indices["train"]) <= set(full.split_indices["train"])
    # A cap above what is left uses everything that is left.
    assert len(_module(path, num_train=1000).split_indices["train"]) == NUM - 9


def test_too_few_structures_names_the_counts(labelled_file):
    path, _ = labelled_file
    with pytest.raises(DataError) as info:
        _module(path, num_val=20, num_test=4)
    message = str(info.value)
    assert str(NUM) in message and "num_val=20" in message and "num_test=4" in message
    assert "cells.extxyz" in message


@pytest.mark.parametrize("kwargs", [{"num_val": 0}, {"num_test": -1}, {"num_train": 0}])
def test_invalid_split_sizes(labelled_file, kwargs):
    with pytest.raises(DataError, match=next(iter(kwargs))):
        _module(labelled_file[0], **kwargs)


def test_a_given_path_wins_over_the_source(labelled_file):
    path, _ = labelled_file
    calls = []

    def source():
        calls.append(1)
        raise AssertionError("source must not be called when a path is given")

    data = AtomsDataModule(path=str(path), source=source, cutoff=CUTOFF, num_val=5, num_test=4)
    assert calls == [] and data.path == path


def test_the_source_is_used_without_a_path(labelled_file, tmp_path):
    path, _ = labelled_file
    copy = tmp_path / "generated.extxyz"
    ase.io.write(copy, ase.io.read(path, ":")[:12])
    data = AtomsDataModule(source=lambda: copy, cutoff=CUTOFF, num_val=2, num_test=2)
    assert data.path == copy and len(data.datasets["train"]) == 8


def test_neither_path_nor_source(tmp_path):
    with pytest.raises(DataError, match="path"):
        AtomsDataModule(cutoff=CUTOFF)
    with pytest.raises(DataError, match="source"):
        AtomsDataModule(source="not callable", cutoff=CUTOFF)


def test_loaders_yield_atoms_batches_of_the_batch_size(labelled_file):
    path, _ = labelled_file
    data = _module(path, batch_size=4, val_batch_size=3)
    train = list(data.train_loader())
    assert all(isinstance(b, AtomsBatch) for b in train)
    assert [len(b) for b in train] == [4, 4, 4, 3]  # 15 training structures
    assert [infer_batch_size(b) for b in train] == [len(b) for b in train]
    for batch in train:
        assert batch[keys.NUM_ATOMS].sum() == batch[keys.POSITIONS].shape[0] == batch.num_atoms_total
        assert batch[keys.ENERGY].shape == (len(batch),)
    assert [len(b) for b in data.val_loader()] == [3, 2]
    assert [len(b) for b in data.test_loader()] == [3, 1]
    # Training order is shuffled, seeded, and every structure appears once per epoch.
    energies = [torch.cat([b[keys.ENERGY] for b in data.train_loader()]) for _ in range(2)]
    in_file_order = torch.stack([g[keys.ENERGY] for g in data.datasets["train"].graphs])
    assert sorted(energies[0].tolist()) == sorted(in_file_order.tolist())
    assert not torch.equal(energies[0], in_file_order)
    again = torch.cat([b[keys.ENERGY] for b in _module(path, batch_size=4).train_loader()])
    assert torch.equal(again, energies[0])


def test_no_test_split_means_no_test_loader(labelled_file):
    data = _module(labelled_file[0], num_test=0)
    assert data.test_loader() is None and len(data.datasets["train"]) == NUM - 5


def test_force_std_and_statistics_come_from_the_right_split(labelled_file):
    path, labels = labelled_file
    data = _module(path)
    test_forces = np.concatenate([labels[i][1].reshape(-1) for i in data.split_indices["test"]])
    # The documented 'standard deviation of the force components' is the population one (ddof=0), as mlff-eval's.
    assert data.force_std("test") == pytest.approx(np.std(test_forces), rel=1e-6)
    val_forces = np.concatenate([labels[i][1].reshape(-1) for i in data.split_indices["val"]])
    assert data.force_std("val") == pytest.approx(np.std(val_forces), rel=1e-6)
    assert data.statistics.num_structures == NUM - 9
    expected = compute_statistics(data.datasets["train"].graphs)
    assert data.statistics.to_dict() == expected.to_dict()  # training split only


def test_configurable_label_keys_through_the_module(labelled_file, tmp_path):
    path, labels = labelled_file
    structures = ase.io.read(path, ":")
    for atoms in structures:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        atoms.info["dft_energy"] = energy
        atoms.new_array("dft_forces", forces)
    custom = tmp_path / "custom.extxyz"
    ase.io.write(custom, structures)
    data = AtomsDataModule(
        path=str(custom), cutoff=CUTOFF, num_val=5, num_test=4, energy_key="dft_energy", forces_key="dft_forces"
    )
    for index, graph in zip(data.split_indices["val"], data.datasets["val"].graphs):
        assert float(graph[keys.ENERGY]) == pytest.approx(labels[index][0], rel=1e-6)
    with pytest.raises(DataError, match="dft_energy"):
        AtomsDataModule(path=str(custom), cutoff=CUTOFF, num_val=5, num_test=4)
