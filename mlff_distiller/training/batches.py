"""What the Trainer needs to know of a batch, whatever its type: how to move it to a device and how many
samples it holds (the weight of its metrics and the throughput's unit)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor (and every object with ``.to``) inside nested dicts, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if hasattr(batch, "to"):  # a batch class of its own (e.g. atomistic batches)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def infer_batch_size(batch: Any) -> int:
    """Samples in ``batch``: ``len(batch)`` for a batch class of its own (e.g. structures in an
    atomistic batch), else the leading dimension of the first tensor inside (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if not isinstance(batch, (dict, list, tuple, str, bytes)) and hasattr(batch, "__len__"):
        return len(batch)
    values: Iterable[Any] = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    )
    for value in values:
        if isinstance(value, (torch.Tensor, dict, list, tuple)) or (
            hasattr(value, "__len__") and not isinstance(value, (str, bytes))
        ):
            return infer_batch_size(value)
    return 1


def safe_len(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without a length (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return None
