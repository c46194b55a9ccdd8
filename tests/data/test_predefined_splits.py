"""Predefined splits (``val_path`` / ``test_path``): each file maps exactly onto its split, statistics come from
the training file alone, and an element the training split lacks is an error naming it and the split."""

from __future__ import annotations

import logging

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from datakit import alloy_cell, emt_labelled, write_emt_file

from mlff_distiller.data import keys
from mlff_distiller.data.dataset import DataError
from mlff_distiller.data.module import AtomsDataModule
from mlff_distiller.data.statistics import compute_statistics

CUTOFF = 4.0


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("splits")
    labels = {}
    for name, num, seed in (("train", 10, 0), ("val", 3, 100), ("test", 5, 200)):
        labels[name] = write_emt_file(directory / f"{name}.extxyz", num, seed=seed)
    return directory, labels


def _module(directory, **kwargs):
    return AtomsDataModule(path=str(directory / "train.extxyz"), cutoff=CUTOFF, batch_size=4, **kwargs)


def test_three_files_map_exactly_onto_train_val_test(three_files):
    directory, labels = three_files
    data = _module(directory, val_path=str(directory / "val.extxyz"), test_path=str(directory / "test.extxyz"))
    for split in ("train", "val", "test"):
        assert data.split_files[split] == directory / f"{split}.extxyz"
        indices = data.split_indices[split]
        # Every structure of its file once (val/test in file order; the training order is seeded).
        assert sorted(indices) == list(range(len(labels[split])))
        if split != "train":
            assert indices == sorted(indices)
        graphs = data.datasets[split].graphs
        assert len(graphs) == len(data.structures(split)) == len(labels[split])
        for graph, index in zip(graphs, indices):
            energy, forces = labels[split][index]
            assert float(graph[keys.ENERGY]) == pytest.approx(energy, rel=1e-6)
            np.testing.assert_allclose(graph[keys.FORCES].numpy(), forces, atol=1e-5)
    test_energies = torch.cat([b[keys.ENERGY] for b in data.test_loader()])
    np.testing.assert_allclose(test_energies.numpy(), [e for e, _ in labels["test"]], rtol=1e-6)
    assert data.statistics.to_dict() == compute_statistics(data.datasets["train"].graphs).to_dict()
    assert data.statistics.num_structures == 10  # the training file alone


def test_one_predefined_split_the_other_drawn(three_files):
    directory, labels = three_files
    data = _module(directory, test_path=str(directory / "test.extxyz"), num_val=2, num_test=1000)
    assert len(data.datasets["test"]) == 5 and len(data.datasets["val"]) == 2 and len(data.datasets["train"]) == 8
    assert sorted(data.split_indices["train"] + data.split_indices["val"]) == list(range(10))
    assert data.split_files["val"] == data.split_files["train"]
    data = _module(directory, val_path=str(directory / "val.extxyz"), num_val=0, num_test=3)
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [7, 3, 3]


def test_the_training_file_as_its_own_test_file_is_refused(three_files, caplog):
    directory, _ = three_files
    with pytest.raises(DataError, match="data.test_path=.*is the training file"):
        _module(directory, test_path=str(directory / "train.extxyz"))
    copy = directory / "copy_of_train.extxyz"
    ase.io.write(copy, ase.io.read(directory / "train.extxyz", ":")[:4])
    with caplog.at_level(logging.WARNING, logger="mlff_distiller.data.module"):
        _module(directory, val_path=str(directory / "val.extxyz"), test_path=str(copy))
    assert "4 of the 4 structures of the test file" in caplog.text and "not held-out" in caplog.text


def _silver_file(path, seed: int):
    structures, _, _ = emt_labelled([alloy_cell(seed), bulk("Ag", "fcc", a=4.09, cubic=True)])
    ase.io.write(path, structures)
    return path


def test_an_element_absent_from_training_is_an_error_naming_it_and_the_split(three_files, tmp_path):
    directory, _ = three_files
    silver = _silver_file(tmp_path / "with_silver.extxyz", 1)
    with pytest.raises(DataError) as info:
        _module(directory, val_path=str(directory / "val.extxyz"), test_path=str(silver))
    message = str(info.value)
    assert "The test split" in message and "with_silver.extxyz" in message and "Ag (structure 1)" in message
    assert "absent from the training split" in message and "train.extxyz" in message
    # Drawn at random from one file: the split that received the element is named, with its structure index.
    mixed = tmp_path / "mixed.extxyz"
    structures = ase.io.read(directory / "train.extxyz", ":") + ase.io.read(silver, ":")[1:]
    ase.io.write(mixed, structures)
    for seed in range(20):
        data_or_error = None
        try:
            data_or_error = AtomsDataModule(path=str(mixed), cutoff=CUTOFF, num_val=2, num_test=2, seed=seed)
        except DataError as error:
            data_or_error = error
        if isinstance(data_or_error, DataError):
            assert "Ag (structure 10)" in str(data_or_error) and "drawn from" in str(data_or_error)
            assert "another seed" in str(data_or_error)
            break
    else:
        pytest.fail("no seed put the silver cell into val or test")


def test_metric_groups_span_all_files(tmp_path):
    structures, _, _ = emt_labelled([alloy_cell(k) for k in range(6)])
    for k, atoms in enumerate(structures):
        if k != 5:
            atoms.info["config_type"] = ["md", "rattle"][k % 2]
    ase.io.write(tmp_path / "train.extxyz", structures[:4])
    structures[4].info["config_type"] = "strained"  # only in the test file
    ase.io.write(tmp_path / "test.extxyz", structures[4:])
    data = AtomsDataModule(
        path=str(tmp_path / "train.extxyz"), test_path=str(tmp_path / "test.extxyz"), cutoff=CUTOFF, num_val=1
    )
    assert data.metric_groups == ["config_type=md", "config_type=rattle", "config_type=strained"]
    batch = next(iter(data.test_loader()))
    assert batch[keys.METRIC_GROUP].tolist() == [2, -1]  # the structure without config_type is in no group
    train_groups = sorted(int(g[keys.METRIC_GROUP]) for s in ("train", "val") for g in data.datasets[s].graphs)
    assert train_groups == [0, 0, 1, 1]
    none = AtomsDataModule(
        path=str(tmp_path / "train.extxyz"), cutoff=CUTOFF, num_val=1, num_test=1, metric_groups_key=None
    )
    assert none.metric_groups == [] and keys.METRIC_GROUP not in next(iter(none.test_loader()))


def test_stress_from_an_info_key(tmp_path):
    structures, _, _ = emt_labelled([alloy_cell(k) for k in range(4)])
    for atoms in structures:
        atoms.info["dft_stress"] = atoms.get_stress()  # Voigt, eV/Å³
    ase.io.write(tmp_path / "s.extxyz", structures)
    data = AtomsDataModule(
        path=str(tmp_path / "s.extxyz"), cutoff=CUTOFF, num_val=1, num_test=1, stress_key="dft_stress"
    )
    batch = next(iter(data.val_loader()))
    index = data.split_indices["val"][0]
    np.testing.assert_allclose(batch[keys.STRESS][0].numpy(), structures[index].get_stress(voigt=False), atol=1e-6)
    with pytest.raises(DataError, match=r"structure 0 of .*s\.extxyz.* has no info\['virial'\] \(stress\)"):
        AtomsDataModule(path=str(tmp_path / "s.extxyz"), cutoff=CUTOFF, num_val=1, num_test=1, stress_key="virial")
