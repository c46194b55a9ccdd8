"""The training loop: learning, losses, history, validation cadence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from trainer_testkit import flat_params, linear_model, loader, make_trainer, mlp, regression_data

from mlff_distiller.training import Callback, ConfigError, Trainer


def _data(n_train=64, n_val=32, batch_size=8):
    """Train and validation samples of the same noiseless linear map."""
    x, y = regression_data(n=n_train, seed=0)
    xv, yv = regression_data(n=n_val, seed=1)
    return loader(x, y, batch_size), loader(xv, yv, batch_size)


def test_loss_falls_by_factor_ten_on_learnable_regression():
    """On a noiseless linear-regression task the last epoch's train loss is < 0.1x the first, and the
    final val loss is tiny."""
    train, val = _data()
    history = make_trainer(linear_model(), train, val, optimizer="adam", learning_rate=0.05, max_epochs=15).fit()
    assert history["train/loss"][-1] < 0.1 * history["train/loss"][0]
    assert history["val/loss"][-1] < 1e-2


def test_default_loss_is_mse_of_inputs_targets_batches():
    """Without loss_fn, val/loss == MSE(model(x_val), y_val) over the whole val set after the last epoch,
    and train/loss is the sample-weighted mean of the per-batch MSEs seen during the epoch."""
    x, y = regression_data(n=20, seed=3)
    train = loader(x, y, batch_size=8)  # batches of 8, 8, 4: the weighting matters
    xv, yv = regression_data(n=12, seed=4)
    val = loader(xv, yv, batch_size=5)  # 5, 5, 2
    batch_losses: list[tuple[float, int]] = []

    class Batches(Callback):
        def on_train_batch_end(self, trainer, batch_index, terms):
            batch_losses.append((float(terms["loss"]), 8 if batch_index < 2 else 4))

    model = linear_model()
    history = make_trainer(model, train, val, max_epochs=1, callbacks=[Batches()]).fit()
    with torch.no_grad():
        expected_val = F.mse_loss(model(xv), yv).item()
    assert history["val/loss"][0] == pytest.approx(expected_val, rel=1e-5)
    expected_train = sum(loss * n for loss, n in batch_losses) / 20
    assert history["train/loss"][0] == pytest.approx(expected_train, rel=1e-6)


def test_default_loss_rejects_batches_that_are_not_pairs():
    """The default loss explains what it expects when a batch is not (inputs, targets)."""
    batches = [(torch.randn(4, 4), torch.randn(4, 1), torch.randn(4))]
    trainer = make_trainer(linear_model(), batches, max_epochs=1)
    with pytest.raises(TypeError, match=r"expects batches of \(inputs, targets\); got tuple of length 3"):
        trainer.fit()


def test_dict_loss_optimises_loss_entry_and_logs_other_terms():
    """A dict loss: only 'loss' drives the gradient (same parameters as the plain MSE run), the other
    terms appear as train/<term> and val/<term>; val/<term> equals a manual computation."""
    train, val = _data()

    def dict_loss(model, batch):
        x, y = batch
        pred = model(x)
        return {
            "loss": F.mse_loss(pred, y),
            "mae": (pred - y).abs().mean(),
            "weight_norm": 100.0 * model.weight.pow(2).sum(),
            "count": 1.0,
        }

    plain_model, dict_model = linear_model(), linear_model()
    make_trainer(plain_model, train, val, max_epochs=2).fit()
    history = make_trainer(dict_model, train, val, max_epochs=2, loss_fn=dict_loss).fit()

    assert torch.equal(flat_params(plain_model), flat_params(dict_model))
    for name in (
        "train/loss",
        "train/mae",
        "train/weight_norm",
        "train/count",
        "val/loss",
        "val/mae",
        "val/weight_norm",
        "val/count",
    ):
        assert len(history[name]) == 2
    xv, yv = val.dataset.tensors
    with torch.no_grad():
        pred = dict_model(xv)
        assert history["val/mae"][-1] == pytest.approx((pred - yv).abs().mean().item(), rel=1e-5)
        assert history["val/weight_norm"][-1] == pytest.approx(100 * dict_model.weight.pow(2).sum().item(), rel=1e-5)
    assert history["val/count"] == [1.0, 1.0]  # non-tensor values are accepted and averaged


def test_subclass_overriding_compute_loss():
    """A subclass's compute_loss replaces the default loss (L1 here): it trains as an L1 loss_fn would,
    and val/loss is the L1 error."""
    train, val = _data()

    class L1Trainer(Trainer):
        def compute_loss(self, batch):
            x, y = batch
            return F.l1_loss(self.model(x), y)

    sub_model, fn_model = linear_model(), linear_model()
    history = make_trainer(sub_model, train, val, max_epochs=2, trainer_cls=L1Trainer).fit()
    make_trainer(fn_model, train, val, max_epochs=2, loss_fn=lambda m, b: F.l1_loss(m(b[0]), b[1])).fit()
    assert torch.equal(flat_params(sub_model), flat_params(fn_model))
    xv, yv = val.dataset.tensors
    with torch.no_grad():
        assert history["val/loss"][-1] == pytest.approx(F.l1_loss(sub_model(xv), yv).item(), rel=1e-5)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (1.5, r"Tensor or a dict with a 'loss' entry; got float\."),
        (None, r"Tensor or a dict with a 'loss' entry; got NoneType\."),
        ({"mse": torch.tensor(1.0), "mae": torch.tensor(2.0)}, r"got dict with keys \['mae', 'mse'\]\."),
        ((torch.tensor(1.0),), r"got tuple\."),
    ],
)
def test_invalid_loss_return_raises_type_error(returned, message):
    """A loss returning neither a tensor nor a dict with 'loss' raises TypeError saying what came back."""
    train, _ = _data()
    trainer = make_trainer(linear_model(), train, loss_fn=lambda model, batch: returned, max_epochs=1)
    with pytest.raises(TypeError, match=message):
        trainer.fit()


def test_history_keys_and_one_entry_per_epoch():
    """history has epoch, train/loss, val/loss, lr, epoch_time_s, train/samples_per_s; one value per epoch."""
    train, val = _data()
    history = make_trainer(linear_model(), train, val, max_epochs=3).fit()
    assert {"epoch", "train/loss", "val/loss", "lr", "epoch_time_s", "train/samples_per_s"} <= set(history)
    assert all(len(values) == 3 for values in history.values())
    assert history["epoch"] == [1.0, 2.0, 3.0]
    assert all(t > 0 and math.isfinite(t) for t in history["epoch_time_s"])
    assert all(s > 0 and math.isfinite(s) for s in history["train/samples_per_s"])
    assert all(isinstance(v, float) for values in history.values() for v in values)


def test_val_interval_skips_validation_and_always_validates_last_epoch():
    """val_interval=2 over 5 epochs validates after epochs 2, 4 and 5; the others hold NaN."""
    train, val = _data()
    validated_at: list[int] = []

    class OnVal(Callback):
        def on_validation_end(self, trainer, metrics):
            validated_at.append(trainer.epoch + 1)

    history = make_trainer(linear_model(), train, val, max_epochs=5, val_interval=2, callbacks=[OnVal()]).fit()
    assert validated_at == [2, 4, 5]
    assert [math.isnan(v) for v in history["val/loss"]] == [True, False, True, False, False]
    assert not any(math.isnan(v) for v in history["train/loss"])


def test_without_val_loader_monitor_falls_back_to_train_loss(tmp_path):
    """No val_loader: the default monitor becomes train/loss and best_model.pt tracks it."""
    train, _ = _data()
    trainer = make_trainer(linear_model(), train, None, max_epochs=3, checkpoint_dir=str(tmp_path))
    history = trainer.fit()
    assert trainer.monitor == "train/loss"
    assert "val/loss" not in history
    assert trainer.best_metric == pytest.approx(min(history["train/loss"]))
    assert (tmp_path / "best_model.pt").is_file()
    with pytest.raises(ConfigError, match="needs a val_loader"):
        make_trainer(linear_model(), train, None, monitor="val/mae")


def test_unknown_monitor_metric_raises_with_available_names():
    """A monitor that is never logged raises ConfigError listing the available metrics."""
    train, val = _data()
    trainer = make_trainer(linear_model(), train, val, monitor="train/accuracy", max_epochs=1)
    with pytest.raises(ConfigError, match=r"monitor='train/accuracy' is not a logged metric; .*'train/loss'"):
        trainer.fit()


def test_should_stop_from_on_optimizer_step_ends_training_after_that_step():
    """Setting trainer.should_stop in on_optimizer_step stops after that step (and still validates)."""
    train, val = _data()  # 8 steps per epoch

    class StopAtStep(Callback):
        def on_optimizer_step(self, trainer):
            if trainer.global_step == 11:
                trainer.should_stop = True

    trainer = make_trainer(mlp(), train, val, max_epochs=5, callbacks=[StopAtStep()])
    history = trainer.fit()
    assert trainer.global_step == 11
    assert history["epoch"] == [1.0, 2.0]
    assert not math.isnan(history["val/loss"][-1])


def test_empty_train_loader_raises():
    """A train loader without batches is an error, not a silent no-op."""
    trainer = make_trainer(linear_model(), [], max_epochs=1)
    with pytest.raises(RuntimeError, match="train_loader yielded no batches"):
        trainer.fit()
