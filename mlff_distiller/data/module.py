"""`AtomsDataModule`: file (or built-in generated set) -> seeded splits -> statistics -> loaders."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .batch import collate_atoms
from .dataset import AtomsDataset, DataError, read_labelled_structures
from .statistics import DatasetStatistics, compute_statistics

log = logging.getLogger(__name__)


class AtomsDataModule:
    """Train/validation/test loaders of labelled structures.

    Args:
        path: any ASE-readable file with energies and forces; when given, ``source`` is not used.
        source: a callable returning such a path (e.g. the built-in teacher-labelled generator).
        cutoff: neighbour-list cutoff, Å (the model's cutoff).
        num_val, num_test: structures held out (seeded random split); the rest trains,
            capped at ``num_train`` when given.
        energy_key, forces_key: ``atoms.info`` / ``atoms.arrays`` keys of the labels; None uses
            the calculator results stored in the file.
        group_key: an ``atoms.info`` key whose equal values must share a split (e.g. ``md_run``).
    """

    def __init__(
        self,
        path: str | None = None,
        source: Callable[[], str | Path] | None = None,
        cutoff: float = 5.0,
        num_val: int = 100,
        num_test: int = 200,
        num_train: int | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        energy_key: str | None = None,
        forces_key: str | None = None,
        group_key: str | None = None,
    ) -> None:
        if path is None and not callable(source):
            raise DataError(
                "Give data.path (an ASE-readable file with energies and forces) or data.source (a "
                f"generator that returns one); got path={path!r}, source={source!r}."
            )
        if num_val < 1 or num_test < 0 or (num_train is not None and num_train < 1):
            raise DataError(
                f"num_val={num_val} must be >= 1, num_test={num_test} >= 0 and num_train={num_train} >= 1 or null."
            )
        self.path = Path(path) if path is not None else Path(source())  # type: ignore[misc]
        structures = read_labelled_structures(self.path, energy_key, forces_key)
        available = len(structures) - num_val - num_test
        if available < 1:
            raise DataError(
                f"{str(self.path)!r} holds {len(structures)} structures: too few for num_val={num_val} "
                f"and num_test={num_test} with at least one left to train on."
            )
        self.split_indices = _split(structures, num_val, num_test, num_train, seed, group_key)
        dataset = AtomsDataset(structures, cutoff)
        self.datasets = {name: dataset.subset(idx) for name, idx in self.split_indices.items()}
        self.statistics: DatasetStatistics = compute_statistics(self.datasets["train"].graphs)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        log.info(
            "Data %s: %s structures (train/val/test), %.1f neighbours per atom within %.2f Å",
            self.path,
            "/".join(str(len(self.datasets[s])) for s in ("train", "val", "test")),
            self.statistics.avg_num_neighbors,
            cutoff,
        )

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        """Each process of a multi-process run reads its own share; ``batch_size`` is per process.

        Training order is a function of (seed, epoch) whatever the number of processes, so the
        batches of N processes together are the batches of one process with N times the batch size.
        """
        in_group = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if in_group else (1, 0)
        dataset = self.datasets[split]
        sampler: Sampler[int] | None = None
        if shuffle:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        elif world > 1:
            sampler = _Shard(len(dataset), world, rank)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_atoms,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None,
        )

    def train_loader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_loader(self) -> DataLoader:
        return self._loader("val", False, self.val_batch_size)

    def test_loader(self) -> DataLoader | None:
        return self._loader("test", False, self.val_batch_size) if self.datasets["test"].graphs else None

    def force_std(self, split: str = "test") -> float:
        """Standard deviation of the force components of a split, eV/Å."""
        graphs: list[dict[str, Any]] = self.datasets[split].graphs
        forces = torch.cat([g["forces"].reshape(-1) for g in graphs])
        return float(forces.std())


class _Shard(Sampler[int]):
    """Every ``world``-th index from ``rank``, without the padding of DistributedSampler, so that
    evaluation metrics summed over processes count each structure exactly once."""

    def __init__(self, size: int, world: int, rank: int) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C and SLURM's SIGTERM reach every process of the job; workers leave the stop to the main
    # process, which finishes its step, saves and shuts them down (a dead worker would fail that step).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _split(
    structures: list[Any], num_val: int, num_test: int, num_train: int | None, seed: int, group_key: str | None
) -> dict[str, list[int]]:
    """Seeded random split. With ``group_key``, structures sharing ``atoms.info[group_key]`` (e.g. the
    snapshots of one MD run) stay on one side, so correlated neighbours cannot leak from train into
    val/test; val and test then overshoot their sizes by less than one group."""
    groups: dict[Any, list[int]] = {}
    for index, atoms in enumerate(structures):
        key = atoms.info.get(group_key) if group_key is not None else None
        groups.setdefault(("single", index) if key is None else ("group", key), []).append(index)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    split: dict[str, list[int]] = {"val": [], "test": [], "train": []}
    for position in order:
        name = "val" if len(split["val"]) < num_val else "test" if len(split["test"]) < num_test else "train"
        split[name].extend(members[position])
    if not split["train"]:
        raise DataError(
            f"Splitting {len(structures)} structures into num_val={num_val} and num_test={num_test}"
            f"{f' by {group_key!r}' if group_key else ''} leaves none to train on."
        )
    if num_train is not None:
        split["train"] = split["train"][:num_train]
    return split
