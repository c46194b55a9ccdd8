"""SchNet and PaiNN students as the trainer uses them: gradients reach the weights, a few steps fit
EMT labels, statistics buffers survive a checkpoint, sizes, dtypes, Hydra construction."""

from __future__ import annotations

import pytest
import torch
from ase.calculators.emt import EMT
from atoms_testkit import MODELS, cu_au_cell, make_batch, methane, predict, small_model, to_item
from hydra.utils import instantiate

from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.statistics import DatasetStatistics, compute_statistics
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet

MODEL_NAMES = ["schnet", "painn"]
STATISTICS = DatasetStatistics(atomic_energies={29: -1.0, 79: -2.0}, force_rms=0.5, avg_num_neighbors=40)


def _interaction_modules(model):
    if isinstance(model, SchNet):
        return list(model.interactions)
    return [*model.messages, *model.updates]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_force_loss_reaches_every_interaction_weight(name):
    model = small_model(name).train()
    batch = make_batch([cu_au_cell(seed=0), methane()])
    forces = model(batch)[keys.FORCES]
    assert forces.requires_grad  # create_graph in train mode
    forces.pow(2).mean().backward()
    for block in _interaction_modules(model):
        for param_name, param in block.named_parameters():
            assert param.grad is not None, param_name
            if param.dim() == 2:
                assert param.grad.abs().sum() > 0, param_name
    # Nothing is left unused (DistributedDataParallel would complain).
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_few_adam_steps_on_emt_labels_reduce_the_loss(name):
    items = []
    for seed in range(4):
        atoms = cu_au_cell(seed=seed, gold=4 + seed, rattle=0.15)
        atoms.calc = EMT()
        items.append(to_item(atoms, cutoff=4.0, dtype=torch.float32, labels=True))
    batch = collate_atoms(items)
    statistics = compute_statistics(items)
    assert statistics.avg_num_neighbors > 10
    model = MODELS[name](cutoff=4.0, hidden=16, interactions=2, num_rbf=8, statistics=statistics).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    atoms = batch[keys.NUM_ATOMS].to(torch.float32)

    def loss_fn():
        out = model(batch)
        energy = ((out[keys.ENERGY] - batch[keys.ENERGY]) / atoms).pow(2).mean()
        return energy + (out[keys.FORCES] - batch[keys.FORCES]).pow(2).mean()

    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    final = float(loss_fn().detach())
    assert final < 0.7 * losses[0], losses + [final]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_statistics_set_the_buffers_and_survive_a_state_dict(name):
    model = MODELS[name](cutoff=4.0, hidden=16, interactions=2, statistics=STATISTICS).double().eval()
    assert model.atomic_energies[29] == -1.0 and model.atomic_energies[79] == -2.0
    assert model.atomic_energies.abs().sum() == 3.0
    assert float(model.scale) == 0.5 and float(model.avg_num_neighbors) == 40.0
    rebuilt = MODELS[name](cutoff=4.0, hidden=16, interactions=2).double().eval()
    assert float(rebuilt.scale) == 1.0
    rebuilt.load_state_dict(model.state_dict())
    batch = make_batch([cu_au_cell(seed=1), methane()])
    for a, b in zip(predict(model, batch), predict(rebuilt, batch)):
        assert torch.equal(a, b)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_default_sizes():
    assert _count(SchNet()) == 64_256  # stated range 40k-120k
    assert _count(PaiNN()) == 151_360  # stated range 100k-250k
    assert 40_000 <= _count(SchNet()) <= 120_000
    assert 100_000 <= _count(PaiNN()) <= 250_000


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_float32_matches_float64(name):
    model = small_model(name).eval()
    batch = make_batch([cu_au_cell(seed=2), methane()])
    energy64, forces64 = predict(model, batch)
    energy32, forces32 = predict(model.float(), batch.to("cpu", dtype=torch.float32))
    assert energy32.dtype == forces32.dtype == torch.float32
    torch.testing.assert_close(energy32.double(), energy64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forces32.double(), forces64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_runs_and_trains(name):
    model = MODELS[name](cutoff=4.0, hidden=16, interactions=2).train()
    batch = make_batch([cu_au_cell(seed=2)], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out[keys.ENERGY].dtype == torch.float32 and torch.isfinite(out[keys.FORCES]).all()
    out[keys.FORCES].pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hydra_builds_the_model_with_statistics(name):
    target = {"schnet": "mlff_distiller.models.schnet.SchNet", "painn": "mlff_distiller.models.painn.PaiNN"}[name]
    config = {"_target_": target, "cutoff": 4.5, "hidden": 8, "interactions": 1, "num_rbf": 6, "max_z": 90}
    model = instantiate(config, statistics=STATISTICS)
    assert isinstance(model, MODELS[name]) and model.cutoff == 4.5 and float(model.scale) == 0.5
    assert model.embedding.num_embeddings == 91
    predict(model.double(), make_batch([methane()], cutoff=4.5))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_invalid_sizes_are_refused(name):
    with pytest.raises(ValueError, match="interactions"):
        MODELS[name](interactions=0)
    with pytest.raises(ValueError, match="cutoff"):
        MODELS[name](cutoff=0.0)
