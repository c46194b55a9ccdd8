"""Losses and metrics: callables ``loss(model, batch) -> {"loss": ..., other terms}``."""
