"""Multi-process training with the standard ``torch.distributed`` calls, for processes started by
``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

The Trainer asks this module who it is (rank, world size) and which device to use, and agrees with the
other processes through it (finite steps, stops, summed metrics); one process (rank 0) writes checkpoints
and logs. Every function is a no-op (no tensor, no host sync) in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .metrics import MetricSums


def launched_distributed() -> bool:
    """True when the environment describes more than one process (e.g. under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> None:
    """Join the process group described by the environment (once): ``nccl`` on GPUs, ``gloo`` on CPU.

    On GPUs each process takes the GPU of its ``LOCAL_RANK``.
    """
    if not launched_distributed() or is_initialized():
        return
    if torch.cuda.is_available():
        if device != "cpu":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Both backends: CPU tensors (e.g. trainer.device=cpu on a GPU node) go through gloo.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_device(device: str) -> str:
    """The device string a process should use: ``cuda:LOCAL_RANK`` for CUDA under a launcher."""
    if is_initialized() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """``model`` wrapped in DistributedDataParallel (gradients averaged across processes); None in one process."""
    if world_size() == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available else CPU; a CUDA request without CUDA is a ConfigError."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r} is invalid: accepted are 'auto', 'cpu', 'cuda', 'cuda:N'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} is invalid here: CUDA is not available; accepted: 'cpu' or 'auto'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported; accepted are 'auto', 'cpu', 'cuda', 'cuda:N'.")
    return resolved


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse a mixed-precision mode the device cannot run (fp16 needs CUDA; bf16 a GPU that has it)."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"mixed_precision='fp16' is invalid on device {str(device)!r}: fp16 needs CUDA; accepted here: "
            "'off' or 'bf16'."
        )
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"mixed_precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; "
            "accepted: 'off' or 'fp16'."
        )


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); a no-op in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` as held by rank ``source``, on every rank."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def agree_max(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value's maximum over all processes (one all-reduce); the values themselves in a single process."""
    if world_size() == 1:
        return list(values)
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device), "max").tolist()


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """Whether a boolean tensor flag holds on every process (without a host sync)."""
    if world_size() == 1:
        return flag
    return all_reduce_((~flag).float(), "max") == 0


def reduce_metric_sums(sums: MetricSums, counts: Sequence[int], device: torch.device) -> tuple[MetricSums, list[int]]:
    """Totals and counts of every term, and the integer ``counts``, summed over all processes (one all-reduce)."""
    if world_size() == 1:
        return sums, list(counts)
    # A process may hold no terms (an empty shard, a resumed partial epoch): agree on the names first.
    gathered: list[tuple[list[str], list[str]]] = [([], []) for _ in range(world_size())]
    dist.all_gather_object(gathered, (sorted(sums.sums), sorted(sums.roots)))
    names = sorted(set().union(*(g[0] for g in gathered)))
    zero = torch.zeros(2, dtype=torch.float64, device=device)
    extra = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device)
    packed = all_reduce_(torch.cat([sums.sums.get(k, zero).to(device) for k in names] + [extra]))
    reduced = MetricSums()
    reduced.sums = {k: packed[2 * i : 2 * i + 2] for i, k in enumerate(names)}
    reduced.roots = set().union(*(g[1] for g in gathered))
    return reduced, [int(c) for c in packed[2 * len(names) :].tolist()]


def run_on_rank0(action: Callable[[], Any], device: torch.device, failed: Exception) -> None:
    """Run ``action`` on rank 0 alone (e.g. a file write); every process learns whether it raised and stops
    with it: rank 0 with its own error, the others with ``failed``."""
    failure: Exception | None = None
    if rank() == 0:
        try:
            action()
        except Exception as error:  # any failure: the other processes must not wait for rank 0 forever
            failure = error
    (any_failed,) = agree_max([float(failure is not None)], device)
    if failure is not None:
        raise failure
    if any_failed > 0:
        raise failed


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
