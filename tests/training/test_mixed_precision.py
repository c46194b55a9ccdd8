"""bf16 autocast on CPU."""

from __future__ import annotations

import math

import torch
from trainer_testkit import RecordingLogger, loader, make_trainer, mlp, regression_data

from mlff_distiller.training import Callback


class DtypeProbe(Callback):
    """Loss-term dtypes seen after each backward."""

    def __init__(self):
        self.term_dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, batch_index, terms):
        self.term_dtypes.update(v.dtype for v in terms.values())


def test_bf16_on_cpu_trains_under_autocast_and_logs_float32():
    """mixed_precision='bf16' on CPU: the linear layers really run in bfloat16, the loss still falls
    (< 0.2x after 15 epochs), parameters stay float32, loss terms handed to callbacks are float32 and
    logged metrics are finite Python floats."""
    x, y = regression_data(n=64, seed=0)
    xv, yv = regression_data(n=32, seed=1)
    model = mlp(hidden=16)
    layer_dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda module, args, out: layer_dtypes.add(out.dtype))
    probe, logger = DtypeProbe(), RecordingLogger()
    trainer = make_trainer(
        model,
        loader(x, y),
        loader(xv, yv),
        max_epochs=15,
        optimizer="adam",
        learning_rate=0.02,
        mixed_precision="bf16",
        log_interval=5,
        callbacks=[probe],
        loggers=[logger],
    )
    history = trainer.fit()

    assert layer_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert probe.term_dtypes == {torch.float32}
    assert history["train/loss"][-1] < 0.2 * history["train/loss"][0]
    assert history["val/loss"][-1] < 0.2 * history["val/loss"][0]
    logged = [v for _, metrics in logger.records for v in metrics.values()]
    assert logged and all(type(v) is float and math.isfinite(v) for v in logged)


def test_bf16_loss_fn_terms_are_upcast():
    """A loss_fn that returns bfloat16 terms: history/loggers still get float32-based values, not bf16."""
    x, y = regression_data(n=32, seed=0)

    def bf16_terms(model, batch):
        inputs, targets = batch
        err = (model(inputs) - targets).to(torch.bfloat16)
        return {"loss": err.float().pow(2).mean(), "bf16_term": err.pow(2).mean()}

    probe = DtypeProbe()
    history = make_trainer(
        mlp(), loader(x, y), loader(x, y), max_epochs=2, mixed_precision="bf16", loss_fn=bf16_terms, callbacks=[probe]
    ).fit()
    assert probe.term_dtypes == {torch.float32}
    assert all(math.isfinite(v) for v in history["val/bf16_term"])
