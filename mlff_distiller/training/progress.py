"""Where the running epoch stands: :class:`EpochProgress`, saved in mid-epoch checkpoints so that a run
resumes inside the epoch with the same order of batches and the same partial metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .checkpoint import CheckpointError
from .metrics import MetricSums
from .rng import capture_rng_state, loader_generator, restore_rng_state

log = logging.getLogger(__name__)


@dataclass
class EpochProgress:
    """Position and partial metrics of the running epoch (a checkpoint holds it as plain data)."""

    lr: float
    """Learning rate of the epoch's first optimizer step (the epoch's ``lr`` metric)."""
    rng: dict[str, Any]
    """The global RNG states at the epoch's start, from which the loader draws its order."""
    loader_generator: torch.Tensor | None
    """The state of the loader's own generator at the epoch's start (None: it has none)."""
    batches: int = 0
    """Micro-batches consumed; a saved position is always at an optimizer-step boundary."""
    processed: int = 0
    """Samples trained on (throughput)."""
    samples: int = 0
    """Samples in applied optimizer steps (a step skipped as non-finite does not count in the metrics)."""
    sums: MetricSums = field(default_factory=MetricSums)
    """(total, count) of every loss term over the applied steps."""
    elapsed_s: float = 0.0
    """Training time of the epoch before the current run's part of it (for ``train/samples_per_s``)."""

    @classmethod
    def start(cls, loader: Any, lr: float) -> EpochProgress:
        """The position at the start of an epoch over ``loader``."""
        generator = loader_generator(loader)
        return cls(lr=lr, rng=capture_rng_state(), loader_generator=generator.get_state() if generator else None)

    def add_window(self, window: MetricSums, samples: int, applied: bool) -> None:
        """Count an accumulation window that ended in an optimizer step (its terms only if it was applied)."""
        self.processed += samples
        if applied:
            self.sums.merge(window)
            self.samples += samples

    def batches_of(self, loader: Iterable[Any], epoch: int) -> Iterator[tuple[int, Any]]:
        """The epoch's (index, batch) pairs. After a mid-epoch resume the loader's order is replayed from the
        epoch's starting RNG states and the batches already trained on are skipped."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the order is a function of (seed, epoch)
            sampler.set_epoch(epoch)
        if self.batches == 0:
            return enumerate(loader)
        now = capture_rng_state()
        restore_rng_state(self.rng)
        generator = loader_generator(loader)
        if self.loader_generator is not None and generator is not None:
            generator.set_state(self.loader_generator.cpu())
        if getattr(loader, "persistent_workers", False) and not hasattr(sampler, "set_epoch"):
            log.warning(
                "Resuming inside an epoch with persistent DataLoader workers and a random sampler: the loader "
                "draws its seeds differently in a fresh process, so the rest of this epoch's order is not the "
                "uninterrupted run's. A DistributedSampler (order = f(seed, epoch)) makes it exact."
            )
        iterator = iter(loader)
        for skipped in range(self.batches):
            try:
                next(iterator)
            except StopIteration:
                raise CheckpointError(
                    f"The checkpoint stopped after batch {self.batches} of epoch {epoch + 1}, but train_loader now "
                    f"yields only {skipped} batches: resume with the same data and batch size."
                ) from None
        restore_rng_state(now)  # the model's own draws (dropout) continue from the saved state
        log.info("Resumed inside epoch %d: skipped the %d batches already trained on.", epoch + 1, self.batches)
        return enumerate(iterator, start=self.batches)

    def reduced(self, device: torch.device) -> EpochProgress:
        """The same position with the partial metrics summed over all processes (what a checkpoint holds)."""
        from . import distributed

        sums, (samples, processed) = distributed.reduce_metric_sums(self.sums, [self.samples, self.processed], device)
        return replace(self, sums=sums, samples=samples, processed=processed)

    def without_sums(self) -> EpochProgress:
        """The same position with empty partial metrics (processes other than rank 0 after a resume: the
        saved sums are already totals over all processes and must count once)."""
        return replace(self, sums=MetricSums(), samples=0, processed=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "processed": self.processed,
            "samples": self.samples,
            "sums": self.sums.state_dict(),
            "elapsed_s": self.elapsed_s,
            "lr": self.lr,
            "rng": self.rng,
            "loader_generator": self.loader_generator,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> EpochProgress:
        sums = state["sums"]
        if "roots" in sums:
            metric_sums = MetricSums.from_state_dict(sums, device)
        else:  # format 2 before exact metrics: sample-weighted sums of per-sample means
            metric_sums = MetricSums()
            for name, weighted in sums.items():
                metric_sums.sums[name] = torch.tensor(
                    [float(weighted), float(state["samples"])], dtype=torch.float64, device=device
                )
        return cls(
            lr=state["lr"],
            rng=state["rng"],
            loader_generator=state["loader_generator"],
            batches=state["batches"],
            processed=state["processed"],
            samples=state["samples"],
            sums=metric_sums,
            elapsed_s=state["elapsed_s"],
        )
