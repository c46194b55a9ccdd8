"""Exact metrics: loss terms reported as (total, count) pairs that add up over batches and processes.

A loss returns, besides the tensor it optimises, metrics such as a force MAE. A batch mean averaged over
batches is exact only when every batch holds the same number of items (force components, atoms); a
:class:`Mean` instead carries the batch's *sum* and *count*, which the Trainer adds up over the whole split
(and over processes) and divides once. :class:`RootMean` does the same for RMSEs (a sum of squares, with the
square root taken at the end). A plain tensor term is treated as a per-sample mean and weighted by the
batch's number of samples, as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch


class Mean(NamedTuple):
    """A metric reported as ``total / count`` over everything accumulated."""

    total: torch.Tensor
    """Sum of the quantity over the items of the batch (e.g. |force error| summed over components)."""
    count: torch.Tensor
    """Number of items summed (e.g. force components); may be a float (a weight)."""


class RootMean(Mean):
    """A metric reported as ``sqrt(total / count)``: ``total`` is a sum of squares (an RMSE)."""


class MetricSums:
    """Running (total, count) of every term, in float64; :meth:`compute` divides once.

    Terms missing from a batch simply do not count there: a metric present in only some batches is the
    mean over those.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        """Term name -> (2,) float64 tensor ``[total, count]``."""
        self.roots: set[str] = set()
        """Names reported as the square root of the mean (RMSEs)."""

    def add(self, terms: Mapping[str, Any], weight: int) -> None:
        """Fold one batch's terms in; a plain tensor term counts as a mean over ``weight`` samples."""
        # Called once per micro-batch: each conversion is skipped when it would change nothing (a float64 scalar
        # is already its own sum), which halves the small-tensor work and leaves every value bit for bit the same.
        for name, value in terms.items():
            if isinstance(value, Mean):
                total = _float64_sum(value.total)
                pair = torch.stack([total, _float64_sum(torch.as_tensor(value.count, device=total.device))])
                if isinstance(value, RootMean):
                    self.roots.add(name)
            else:
                mean = value.detach().to(torch.float64).reshape(())
                pair = torch.stack([mean * weight, torch.full_like(mean, float(weight))])
            self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def merge(self, other: MetricSums) -> None:
        """Add ``other``'s totals and counts to these."""
        for name, pair in other.sums.items():
            self.sums[name] = self.sums[name] + pair if name in self.sums else pair
        self.roots |= other.roots

    def mean(self, name: str) -> torch.Tensor:
        """``total / count`` of one term, as a tensor (no host sync)."""
        pair = self.sums[name]
        return pair[0] / pair[1]

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Every term's value, ``{prefix}{name}``; NaN for a term with a zero count."""
        out: dict[str, float] = {}
        for name in sorted(self.sums):
            total, count = (float(x) for x in self.sums[name].tolist())
            value = total / count if count > 0 else math.nan
            out[f"{prefix}{name}"] = math.sqrt(value) if name in self.roots and value >= 0 else value
        return out

    def __bool__(self) -> bool:
        return bool(self.sums)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "roots": sorted(self.roots)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> MetricSums:
        out = cls()
        out.sums = {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in state["sums"].items()}
        out.roots = set(state.get("roots", ()))
        return out


def _float64_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed in float64, as a scalar (a float64 scalar as it is)."""
    value = value.detach()
    if value.dtype != torch.float64:
        value = value.to(torch.float64)
    return value.sum() if value.dim() else value


def detached(terms: Mapping[str, Any]) -> dict[str, Any]:
    """Loss terms without their graphs, in float32 at least (callbacks and sums never see half precision)."""

    def upcast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    return {k: type(v)(*map(upcast, v)) if isinstance(v, Mean) else v.detach().float() for k, v in terms.items()}


def loss_terms(out: Any, device: torch.device) -> dict[str, Any]:
    """What a loss returned as named terms: a tensor is the ``loss``; a dict must hold a ``loss`` entry (its
    numbers become tensors, :class:`Mean` terms stay as they are)."""
    if isinstance(out, torch.Tensor):
        return {"loss": out}
    if isinstance(out, Mapping) and "loss" in out:
        return {
            k: v if isinstance(v, (torch.Tensor, Mean)) else torch.as_tensor(v, device=device) for k, v in out.items()
        }
    raise TypeError(
        f"The loss must be a Tensor or a dict with a 'loss' entry; got {type(out).__name__}"
        + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else "")
        + "."
    )
