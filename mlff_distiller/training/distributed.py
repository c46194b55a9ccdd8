"""Multi-process training with the standard ``torch.distributed`` calls, for processes started by
``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

The Trainer asks this module who it is (rank, world size) and uses it to agree across processes;
one process (rank 0) writes checkpoints and logs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


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


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
