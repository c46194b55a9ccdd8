"""Learning from the stability gate's failure: DP-GEN's exploration, aimed at the final student itself.

The active loop explores with a cheap committee in runs of at most a few ps; the final student can still fail
where they never went (a water molecule that folds after 16 ps at 450 K). When the gate's MD of the final
student becomes unstable, the report keeps the sane frames of the last ``gate.failure_window_ps`` before it
did (``gate_failure_frames.extxyz``); when its NVE drifts beyond the bound, those of the window before its
largest energy jump (the student is not conservative there: where its forces are wrong). A refinement pass

1. picks ``frames`` of them, evenly spaced up to the last sane one (:func:`pick_frames`), as many as the
   teacher budget leaves;
2. labels them as round 0 was labelled (:func:`label_like_round0`: the same Hessian rows, site energies and
   workers), with their provenance (``gate:trajectory=0:segment=nvt:failure=unstable:step=...``,
   ``config_type=gate_failure``);
3. adds them to the training split only (the validation and test splits stay the same structures, so the
   metrics before and after compare; :func:`write_pass_sets`) and trains the student on, warm, for
   ``epochs`` (:func:`fine_tune`);

and the report runs again on the refined student, with the seed moved on by one per pass so that its gate and
fresh frames follow trajectories it never learned from; its verdict is the run's. ``mlff-train`` drives the passes
(:func:`mlff_distiller.distill.compose.final_report`): at most ``passes``, stopping once the gate passes, it
failed with no frames to learn from (an NVT temperature off its target), or the budget is spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..teachers.cache import write_structures_atomic

if TYPE_CHECKING:
    from ase import Atoms
    from torch import nn

    from ..data.module import AtomsDataModule
    from ..teachers.sampling import SamplingConfig
    from ..training import Trainer, TrainingConfig


@dataclass
class RefineConfig:
    """Refinement passes after a failed gate (``distill_report.refine``)."""

    passes: int = 0
    """Passes at most (0: none); each labels, trains and reports again."""
    frames: int = 16
    """Gate frames labelled per pass, at most (the teacher budget permitting)."""
    epochs: int = 30
    """Training epochs of each pass, warm from the student before it."""

    def __post_init__(self) -> None:
        for name, low in (("passes", 0), ("frames", 1), ("epochs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"distill_report.refine.{name}={value!r} is invalid: it must be an integer >= {low}.")


def pick_frames(frames: Sequence[Atoms], count: int) -> list[Atoms]:
    """``count`` of ``frames`` (in time order), evenly spaced and always including the last (the closest to the
    failure); all of them when there are no more than ``count``."""
    if count >= len(frames):
        return list(frames)
    if count <= 0:
        return []
    positions = np.unique(np.round(np.linspace(len(frames) - 1, 0, count)).astype(int))
    return [frames[i] for i in positions]


def label_like_round0(
    structures: Sequence[Atoms], sampling: SamplingConfig, teacher: Any, path: Path, seed: int, progress: bool = False
) -> Path:
    """Label ``structures`` into ``path`` (resumable) as round 0 is labelled: the same Hessian rows, site energies
    and label workers (``teacher``: the calculator, used when there is one worker)."""
    from ..teachers.calculators import CalculatorSpec
    from ..teachers.labelling import label_structures

    s = sampling
    return label_structures(
        structures,
        CalculatorSpec(s.teacher, s.teacher_kwargs) if s.label_workers > 1 else teacher,
        path,
        chunk_size=s.chunk_size,
        progress=progress,
        hessian_rows=s.hessian_rows,
        hessian_delta=s.hessian_delta,
        hessian_seed=seed,
        hessian_method=s.hessian_method,
        site_energies=s.site_energies,
        workers=s.label_workers,
    )


def write_pass_sets(data: AtomsDataModule, added: Sequence[Path], directory: Path) -> dict[str, Path]:
    """The splits of a refinement pass, as files in ``directory``: ``train.extxyz`` (the training split of
    ``data`` plus the structures of every file in ``added``), ``val.extxyz`` and ``test.extxyz`` (its
    validation and test splits, unchanged). Labels stay as they were written (calculator results, rows)."""
    from ase.io import read

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[Path, list[Atoms]] = {}
    paths: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        source = data.split_files[split]
        if source not in files:
            files[source] = read(source, ":")
        chosen = [files[source][i] for i in data.split_indices[split]]
        if split == "train":
            for path in added:
                chosen += read(path, ":")
        paths[split] = directory / f"{split}.extxyz"
        write_structures_atomic(paths[split], chosen)
    return paths


def fine_tune(
    model: nn.Module,
    data: AtomsDataModule,
    training: TrainingConfig,
    directory: Path,
    epochs: int,
    loss: Any,
    optimizer: Callable[..., Any] | None,
    lr_scheduler: Callable[..., Any] | None,
    loggers: Sequence[Any] = (),
    callbacks: Mapping[str, Any] | None = None,
) -> Trainer:
    """Train ``model`` (its current weights: the student before this pass) on ``data`` for ``epochs`` with
    ``training``'s settings, checkpoints in ``directory`` (a finished pass there is loaded, a killed one
    continues); returns the trainer, its best weights loaded into ``model``."""
    from ..training import Trainer, load_model_weights
    from ..training.checkpoint import resume_candidates

    config = dataclasses.replace(training, checkpoint_dir=str(directory), max_epochs=epochs)
    trainer = Trainer(
        model,
        data.train_loader(),
        data.val_loader(),
        config=config,
        loss_fn=loss,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        loggers=list(loggers),
        callbacks=dict(callbacks or {}),
    )
    if resume_candidates(directory):
        trainer.load_checkpoint(directory)
    trainer.fit()
    load_model_weights(model, directory / "best_model.pt")
    return trainer


def frames_within_budget(wanted: int, budget: int | None, used: int, per_structure: int) -> int:
    """How many structures of ``per_structure`` teacher calls each the budget (None: none) still pays for."""
    if budget is None:
        return wanted
    return max(0, min(wanted, (budget - used) // max(1, per_structure)))
