"""Edge pairing: the students compute distance functions once per (i -> j, j -> i) pair. The pairing must
be exact, fall back when the list has no reverse edges, and change no number the students output."""

from __future__ import annotations

import pytest
import torch
from ase import Atoms
from atoms_testkit import MODELS, cu_au_cell, make_batch, methane, small_model, to_item

from mlff_distiller.data import keys
from mlff_distiller.data.batch import AtomsBatch, as_plain_dict, collate_atoms, edge_vectors
from mlff_distiller.data.neighbors import neighbor_list
from mlff_distiller.models import common


def _tiny_cell() -> Atoms:
    """Two atoms in a 2 Å cell with a 4.5 Å cutoff: many images of one pair and periodic self-images."""
    return Atoms("CuAu", positions=[[0.1, 0.2, 0.0], [1.0, 1.1, 0.9]], cell=[2.0, 2.1, 2.2], pbc=True)


@pytest.mark.parametrize("structures", [[cu_au_cell()], [_tiny_cell()], [methane()], [cu_au_cell(1), methane()]])
def test_every_edge_is_paired_with_its_reverse(structures):
    cutoff = 4.5
    batch = make_batch(structures, cutoff=cutoff)
    vectors = edge_vectors(batch)
    edge_index, half_vectors, paired = common.pair_edges(batch, vectors)
    num_edges = batch[keys.EDGE_INDEX].shape[1]
    half = num_edges // 2
    assert paired and edge_index.shape == (2, num_edges) and half_vectors.shape == (half, 3)
    assert torch.equal(edge_index[:, half:], edge_index[:, :half].flip(0))
    # The same set of edges, reordered: match each to the original list by (i, j, vector).
    original = {
        (int(i), int(j), tuple(v.round(decimals=9).tolist())) for (i, j), v in zip(batch[keys.EDGE_INDEX].T, vectors)
    }
    reordered = torch.cat([half_vectors, -half_vectors])
    assert {
        (int(i), int(j), tuple(v.round(decimals=9).tolist())) for (i, j), v in zip(edge_index.T, reordered)
    } == original


def test_a_list_without_reverse_edges_is_left_unpaired():
    batch = make_batch([cu_au_cell()])
    i, j = batch[keys.EDGE_INDEX]
    one_way = i < j  # a half list: no edge has its reverse
    half_list = batch.replace(
        **{keys.EDGE_INDEX: batch[keys.EDGE_INDEX][:, one_way], keys.CELL_SHIFTS: batch[keys.CELL_SHIFTS][one_way]}
    )
    vectors = edge_vectors(half_list)
    edge_index, same_vectors, paired = common.pair_edges(half_list, vectors)
    assert not paired and edge_index is half_list[keys.EDGE_INDEX] and same_vectors is vectors


@pytest.mark.parametrize("name", sorted(MODELS))
def test_paired_and_unpaired_students_agree(name, monkeypatch):
    """Energy, forces and stress (float64) and the force-loss gradients are the same with and without pairing
    (in the pipeline's order here; the pairing in the forward is compared with it above)."""
    model = small_model(name, compute_stress=True)
    batch = make_batch([cu_au_cell(2), _tiny_cell(), methane()], labels=False)

    def outputs():
        model.train()
        out = model(batch)
        loss = out[keys.FORCES].pow(2).sum() + out[keys.ENERGY].pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return [out[keys.ENERGY], out[keys.FORCES], out[keys.STRESS], *grads]

    paired = outputs()
    module = __import__(type(model).__module__, fromlist=["pair_edges"])
    monkeypatch.setattr(module, "pair_edges", lambda b, v: common.PairedEdges(b[keys.EDGE_INDEX], v, False))
    unpaired = outputs()
    for a, b in zip(paired, unpaired):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _lexicographic_item(atoms: Atoms, cutoff: float) -> dict[str, torch.Tensor]:
    """A structure's graph with the neighbour list's own (lexicographic) edge order, not paired."""
    item = to_item(atoms, cutoff)
    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    del item[keys.NUM_EDGE_PAIRS]
    item[keys.EDGE_INDEX], item[keys.CELL_SHIFTS] = torch.from_numpy(edge_index), torch.from_numpy(shifts).double()
    return item


def test_pairing_from_the_pipeline_equals_pairing_in_the_forward():
    structures, cutoff = [cu_au_cell(1), _tiny_cell(), methane(), cu_au_cell(2)], 4.5
    from_pipeline = make_batch(structures, cutoff=cutoff)
    assert from_pipeline[keys.NUM_EDGE_PAIRS].tolist() == [
        to_item(atoms, cutoff)[keys.EDGE_INDEX].shape[1] // 2 for atoms in structures
    ]
    unpaired = collate_atoms([_lexicographic_item(atoms, cutoff) for atoms in structures])
    assert keys.NUM_EDGE_PAIRS not in unpaired
    pipeline = common.pair_edges(from_pipeline, edge_vectors(from_pipeline))
    in_forward = common.pair_edges(unpaired, edge_vectors(unpaired))
    assert pipeline.paired and in_forward.paired
    assert torch.equal(pipeline.edge_index, in_forward.edge_index)
    assert torch.equal(pipeline.vectors, in_forward.vectors)
    # The pipeline's order is used as it is: no reordering, the first half's vectors.
    assert pipeline.edge_index is from_pipeline[keys.EDGE_INDEX]
    assert torch.equal(pipeline.vectors, edge_vectors(from_pipeline)[: pipeline.vectors.shape[0]])


def test_a_batch_mixing_paired_and_unpaired_structures_is_unpaired_and_gives_the_same_numbers():
    model = small_model("painn", compute_stress=True)
    structures = [cu_au_cell(3), methane()]
    paired = make_batch(structures)
    mixed = collate_atoms([to_item(structures[0]), _lexicographic_item(structures[1], 4.0)])
    assert keys.NUM_EDGE_PAIRS in paired and keys.NUM_EDGE_PAIRS not in mixed
    for a, b in zip(model(paired).values(), model(mixed).values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_edges_marked_paired_that_are_not_fail_loudly():
    batch = make_batch([cu_au_cell(4)])
    edge_index = batch[keys.EDGE_INDEX].clone()
    edge_index[:, [0, 1]] = edge_index[:, [1, 0]]  # two edges of the first half swapped, their reverses not
    corrupted = AtomsBatch({**as_plain_dict(batch), keys.EDGE_INDEX: edge_index})
    assert keys.NUM_EDGE_PAIRS in corrupted
    with pytest.raises(RuntimeError, match="not"):
        small_model("schnet")(corrupted)
    # Editing the edges through replace() drops the mark: the students pair (or not) by themselves.
    edited = batch.replace(**{keys.EDGE_INDEX: edge_index})
    assert keys.NUM_EDGE_PAIRS not in edited and keys.NUM_EDGE_PAIRS in batch.replace(
        **{keys.POSITIONS: batch[keys.POSITIONS]}
    )
    item = to_item(cu_au_cell(4))
    item[keys.NUM_EDGE_PAIRS] = item[keys.NUM_EDGE_PAIRS] + 1
    with pytest.raises(ValueError, match="Structure 1 of the batch has"):
        collate_atoms([to_item(methane()), item])
