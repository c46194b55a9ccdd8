"""Exact metrics: terms returned as (total, count) are reduced over the whole split, whatever the batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from trainer_testkit import make_trainer

from mlff_distiller.training.metrics import Mean, MetricSums, RootMean


class RaggedSet(Dataset):
    """Samples of different sizes (1 to 7 values each), so that batch means are not the split's mean."""

    def __init__(self, count: int = 23, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        sizes = torch.randint(1, 8, (count,), generator=generator).tolist()
        self.items = [torch.randn(size, 2, generator=generator, dtype=torch.float64) for size in sizes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"x": torch.cat(items), "sizes": torch.tensor([len(item) for item in items])}


def samples(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["sizes"])


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x[:, 0]


def ragged_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    error = model(batch["x"]) - batch["x"][:, 1]
    count = torch.tensor(float(error.numel()), dtype=torch.float64)
    return {
        "loss": error.pow(2).mean(),
        "mae": Mean(error.abs().sum(), count),
        "rmse": RootMean(error.pow(2).sum(), count),
        "batch_mean_mae": error.abs().mean(),  # a plain term: weighted by samples, not exact
    }


def direct(model: nn.Module, dataset: RaggedSet) -> tuple[float, float]:
    with torch.no_grad():
        errors = torch.cat([model(x) - x[:, 1] for x in dataset.items])
    return float(errors.abs().mean()), float(errors.pow(2).mean().sqrt())


@pytest.mark.parametrize("batch_size", [1, 4, 5, 23])
def test_validation_mean_terms_are_exact_for_any_batch_size(batch_size):
    dataset = RaggedSet()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    model = Scale()
    trainer = make_trainer(model, loader, loader, loss_fn=ragged_loss, batch_size_fn=samples)
    metrics = trainer.validate(loader, prefix="test")
    mae, rmse = direct(model, dataset)
    assert metrics["test/mae"] == pytest.approx(mae, rel=1e-12)
    assert metrics["test/rmse"] == pytest.approx(rmse, rel=1e-12)
    if batch_size not in (1, 23):  # a per-sample-weighted batch mean is off for ragged samples
        assert abs(metrics["test/batch_mean_mae"] - mae) > 1e-6


def test_training_mean_terms_are_exact_over_applied_steps_with_accumulation():
    dataset = RaggedSet(count=10)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate)
    model = Scale()
    # lr tiny, so the weights barely move and the epoch's error equals a fixed-weight pass to first order.
    trainer = make_trainer(
        model,
        loader,
        None,
        loss_fn=ragged_loss,
        batch_size_fn=samples,
        max_epochs=1,
        learning_rate=1e-12,
        gradient_accumulation_steps=2,
        monitor="train/loss",
    )
    history = trainer.fit()
    mae, rmse = direct(model, dataset)
    assert history["train/mae"][0] == pytest.approx(mae, rel=1e-9)
    assert history["train/rmse"][0] == pytest.approx(rmse, rel=1e-9)


def test_metric_sums_merge_state_and_missing_terms():
    one, two = MetricSums(), MetricSums()
    one.add({"a": Mean(torch.tensor(3.0), torch.tensor(2.0)), "b": torch.tensor(1.0)}, weight=4)
    two.add({"a": Mean(torch.tensor(5.0), torch.tensor(6.0)), "c": RootMean(torch.tensor(8.0), torch.tensor(2.0))}, 1)
    one.merge(two)
    values = one.compute("val/")
    assert values == {"val/a": 1.0, "val/b": 1.0, "val/c": 2.0}
    restored = MetricSums.from_state_dict(one.state_dict())
    assert restored.compute("val/") == values
    assert math.isnan(MetricSums.from_state_dict({"sums": {"d": torch.zeros(2)}}).compute()["d"])


def test_metric_sums_add_is_bitwise_the_float64_sum_of_each_term():
    """The per-batch fold skips conversions that change nothing; the pairs must be the plain float64 sums."""
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(37, generator=generator)  # float32: summed in float64
    scalar = torch.randn((), generator=generator, dtype=torch.float64)
    terms = {
        "loss": torch.randn((), generator=generator),
        "vector": Mean(vector, 37),
        "scalar": RootMean(scalar**2, torch.tensor(3.0, dtype=torch.float64)),
        "weights": Mean(scalar, torch.tensor([0.1, 0.7], dtype=torch.float32)),
    }
    sums = MetricSums()
    sums.add(terms, weight=5)
    sums.add(terms, weight=5)
    once = {
        "vector": torch.stack([vector.double().sum(), torch.tensor(37.0, dtype=torch.float64)]),
        "scalar": torch.stack([(scalar**2).double().sum(), torch.tensor(3.0, dtype=torch.float64)]),
        "weights": torch.stack([scalar.sum(), torch.tensor([0.1, 0.7]).double().sum()]),
        "loss": torch.stack([terms["loss"].double() * 5, torch.tensor(5.0, dtype=torch.float64)]),
    }
    for name, pair in once.items():
        assert torch.equal(sums.sums[name], pair + pair), name
        assert sums.sums[name].dtype == torch.float64
    assert sums.roots == {"scalar"}
    assert torch.equal(sums.mean("vector"), (2 * vector.double().sum()) / 74.0)
