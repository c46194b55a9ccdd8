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

from . import keys
from .batch import collate_atoms
from .dataset import AtomsDataset, DataError, check_cutoff, metric_groups_of, read_labelled_structures
from .statistics import DatasetStatistics, compute_statistics

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


class AtomsDataModule:
    """Train/validation/test loaders of labelled structures.

    Args:
        path: any ASE-readable file with energies and forces (the training file); when given, ``source``
            is not used.
        source: a callable returning such a path (e.g. the built-in teacher-labelled generator).
        cutoff: neighbour-list cutoff, Å (the model's cutoff).
        num_val, num_test: structures drawn from ``path`` for validation and test (seeded random split)
            when ``val_path`` / ``test_path`` is not given; the rest trains, capped at ``num_train`` when given.
        val_path, test_path: predefined validation / test files (e.g. a published benchmark split), used
            whole; the training file then keeps those structures. Statistics always come from the training
            split alone.
        energy_key, forces_key, stress_key: ``atoms.info`` / ``atoms.arrays`` / ``atoms.info`` keys of the
            labels (in every file); None uses the calculator results stored in the files.
        group_key: an ``atoms.info`` key whose equal values must share a split (e.g. ``md_run``).
        metric_groups_key: an ``atoms.info`` key (default ``config_type``) by whose values metrics are also
            reported (e.g. ``force_mae/config_type=md_600K``); structures without it belong to no group.

    An element present in the validation or test split but absent from the training split is an error
    (the student would answer for it untrained).
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
        stress_key: str | None = None,
        group_key: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        metric_groups_key: str | None = "config_type",
    ) -> None:
        if path is None and not callable(source):
            raise DataError(
                "Give data.path (an ASE-readable file with energies and forces) or data.source (a "
                f"generator that returns one); got path={path!r}, source={source!r}."
            )
        check_cutoff(cutoff)
        drawn = {"val": num_val if val_path is None else 0, "test": num_test if test_path is None else 0}
        if (val_path is None and num_val < 1) or num_test < 0 or (num_train is not None and num_train < 1):
            raise DataError(
                f"num_val={num_val} must be >= 1 (unless data.val_path is given), num_test={num_test} >= 0 and "
                f"num_train={num_train} >= 1 or null."
            )
        self.path = Path(path) if path is not None else Path(source())  # type: ignore[misc]
        self.split_files: dict[str, Path] = {
            "train": self.path,
            "val": Path(val_path) if val_path is not None else self.path,
            "test": Path(test_path) if test_path is not None else self.path,
        }
        """The file each split comes from (the training file for splits drawn from it)."""
        for name, given in (("val_path", val_path), ("test_path", test_path)):
            if given is not None and Path(given).resolve() == self.path.resolve():
                raise DataError(
                    f"data.{name}={given!r} is the training file itself; give a separate file, or leave "
                    f"data.{name} null to draw the split from the training file (num_{name[:-5]})."
                )
        files: dict[Path, list[Any]] = {}
        for file in self.split_files.values():  # the training file first: its errors come first
            if file not in files:
                files[file] = read_labelled_structures(file, energy_key, forces_key, stress_key=stress_key)
        structures = files[self.path]
        drawable = sum(1 for atoms in structures if not keys.is_train_only(atoms))
        available = drawable - drawn["val"] - drawn["test"]
        if available < 1:
            raise DataError(
                f"{str(self.path)!r} holds {drawable} structures"
                f"{f' (and {len(structures) - drawable} train-only ones)' if drawable < len(structures) else ''}: "
                f"too few for num_val={drawn['val']} "
                f"and num_test={drawn['test']} with at least one left to train on."
            )
        self.split_indices = _split(structures, drawn["val"], drawn["test"], num_train, seed, group_key)
        """Indices of each split's structures in its file (``split_files``)."""
        for name in ("val", "test"):
            if self.split_files[name] != self.path:
                self.split_indices[name] = list(range(len(files[self.split_files[name]])))
        self._structures = {
            name: [files[self.split_files[name]][i] for i in self.split_indices[name]] for name in SPLITS
        }
        _check_elements_are_trained(self._structures, self.split_files, self.split_indices)
        _warn_on_shared_structures(self._structures, self.split_files)
        everything = [atoms for name in SPLITS for atoms in self._structures[name]]
        names, flat_groups = metric_groups_of(everything, metric_groups_key)  # one table for every split
        starts = np.cumsum([0] + [len(self._structures[name]) for name in SPLITS])
        group_of = {name: flat_groups[starts[i] : starts[i + 1]] for i, name in enumerate(SPLITS)}
        self.metric_groups: list[str] = names
        """Names of the metric groups (e.g. ``["config_type=md_600K", "config_type=rattle"]``), indexed by
        the batches' ``metric_group``; empty without ``metric_groups_key`` or when no structure has it."""
        self.datasets = {
            name: AtomsDataset(
                self._structures[name],
                cutoff,
                source=f"the {name} split of {str(self.split_files[name])!r}",
                metric_groups=group_of[name] if self.metric_groups else None,
            )
            for name in SPLITS
        }
        # Without the train-only structures (contact copies: forces of tens of eV/Å), which would set the
        # students' force scale and reference energies far from the structures they are used on.
        typical = [
            graph
            for graph, atoms in zip(self.datasets["train"].graphs, self._structures["train"])
            if not keys.is_train_only(atoms)
        ]
        self.statistics: DatasetStatistics = compute_statistics(typical)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        log.info(
            "Data: %s structures (train/val/test) from %s, %.1f neighbours per atom within %.2f Å",
            "/".join(str(len(self.datasets[s])) for s in SPLITS),
            ", ".join(sorted({str(f) for f in self.split_files.values()})),
            self.statistics.avg_num_neighbors,
            cutoff,
        )

    def structures(self, split: str) -> list[Any]:
        """The ASE ``Atoms`` of a split (labels as ``info["_energy"]`` / ``arrays["_forces"]``), in the order of
        ``datasets[split]`` (the order the validation and test loaders yield)."""
        return list(self._structures[split])

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
        """Standard deviation of the force components of a split, eV/Å (population std, in float64: the same
        figure as :func:`mlff_distiller.evaluation.evaluate_structures`' ``force_std``)."""
        graphs: list[dict[str, Any]] = self.datasets[split].graphs
        forces = torch.cat([g["forces"].reshape(-1) for g in graphs]).double()
        return float(forces.std(correction=0))


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
    val/test; val and test then overshoot their sizes by less than one group. Structures flagged
    ``atoms.info[keys.TRAIN_ONLY]`` are never drawn, and the others split as if they were absent; they are trained
    on unless derived (``keys.DERIVED_FROM``) from a structure held out. ``num_train`` counts them last."""
    groups: dict[Any, list[int]] = {}
    train_only: list[int] = []
    for index, atoms in enumerate(structures):
        if keys.is_train_only(atoms):
            train_only.append(index)
            continue
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
            f"Splitting {len(structures) - len(train_only)} structures into num_val={num_val} and "
            f"num_test={num_test}{f' by {group_key!r}' if group_key else ''} leaves none to train on"
            f"{f' (the {len(train_only)} train-only ones do not count)' if train_only else ''}."
        )
    held_out = {structures[i].info.get("provenance") for name in ("val", "test") for i in split[name]} - {None}
    kept = [i for i in train_only if structures[i].info.get(keys.DERIVED_FROM) not in held_out]
    if len(kept) < len(train_only):
        log.info(
            "Left out %d of %d train-only structures: derived from validation or test ones.",
            len(train_only) - len(kept),
            len(train_only),
        )
    split["train"].extend(kept)
    if num_train is not None:
        split["train"] = split["train"][:num_train]
    return split


def _check_elements_are_trained(
    structures: dict[str, list[Any]], files: dict[str, Path], indices: dict[str, list[int]]
) -> None:
    """An element of the validation or test split that the training split lacks is an error naming both."""
    from ase.data import chemical_symbols

    trained = {int(z) for atoms in structures["train"] for z in atoms.numbers}
    for split in ("val", "test"):
        offenders: dict[int, list[int]] = {}
        for index, atoms in zip(indices[split], structures[split]):
            for z in sorted(set(atoms.numbers.tolist()) - trained):
                offenders.setdefault(int(z), []).append(index)
        if offenders:
            drawn = files[split] == files["train"]
            names = ", ".join(
                f"{chemical_symbols[z]} (structure{'s' if len(found) > 1 else ''} "
                f"{', '.join(map(str, found[:5]))}{' ...' if len(found) > 5 else ''})"
                for z, found in offenders.items()
            )
            raise DataError(
                f"The {split} split ({'drawn from ' if drawn else ''}{str(files[split])!r}) holds {names}, absent from "
                f"the training split of {str(files['train'])!r}; the student would be evaluated on elements it was "
                "never trained on. Add structures with "
                f"{'these elements' if len(offenders) > 1 else 'this element'} to the training data"
                + (" (or choose another seed / num_val / num_test)" if drawn else "")
                + f", or remove them from the {split} split."
            )


def _fingerprint(atoms: Any) -> bytes:
    return b"".join(
        np.ascontiguousarray(a).tobytes()
        for a in (atoms.numbers, np.round(atoms.positions, 6), np.round(atoms.cell.array, 6))
    )


def _warn_on_shared_structures(structures: dict[str, list[Any]], files: dict[str, Path]) -> None:
    """Predefined validation/test files that repeat training structures leak them: say so."""
    trained = {_fingerprint(atoms) for atoms in structures["train"]}
    for split in ("val", "test"):
        if files[split] == files["train"]:
            continue
        shared = sum(_fingerprint(atoms) in trained for atoms in structures[split])
        if shared:
            log.warning(
                "%d of the %d structures of the %s file %s are also in the training file %s (same elements, "
                "positions and cell): their %s metrics are not held-out errors.",
                shared,
                len(structures[split]),
                split,
                files[split],
                files["train"],
                split,
            )
