"""Exponential moving average of model parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class ExponentialMovingAverage:
    """Shadow copy of a model's floating-point parameters, updated after each optimizer step.

    ``shadow = decay * shadow + (1 - decay) * param``; with ``warmup`` the decay used at update n is
    ``min(decay, (1 + n) / (10 + n))`` so early, poor weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self._names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone() for n in self._names]
        self._tracked: tuple[nn.Module, list[torch.Tensor]] | None = None
        """The model last updated from and its parameters in shadow order: walking the module tree for them
        costs more than the update itself on a small model, every step."""

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self._names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards the model's current weights."""
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        # The Parameter objects are kept, not their .data, so an in-place move (model.to) is still seen; a
        # parameter replaced by a new object would be missed, as the optimizer, which holds them too, misses it.
        if self._tracked is None or self._tracked[0] is not model:
            self._tracked = (model, self._params(model))
        torch._foreach_lerp_(self.shadow, self._tracked[1], 1.0 - decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into ``model``; the training weights come back after."""
        params = [p.data for p in self._params(model)]
        backup = [p.clone() for p in params]
        torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(params, backup)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged weights in place of the parameters."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in zip(self._names, self.shadow):
            state[name] = value.detach().clone()
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(zip(self._names, self.shadow)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self._names) - set(shadow))
        unexpected = sorted(set(shadow) - set(self._names))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        with torch.no_grad():
            for tensor, name in zip(self.shadow, self._names):
                tensor.copy_(shadow[name])
