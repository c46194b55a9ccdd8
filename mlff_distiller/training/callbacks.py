"""Callbacks: the few named hooks through which later features (preemption, distillation schedules,
custom metrics) join the loop without editing it.

Subclassing :class:`Callback` is optional: the Trainer calls whichever of these hooks an object defines.
That is how a ``loss_fn`` follows the run (a loss whose terms switch on at some optimizer step defines
``on_optimizer_step`` and reads ``trainer.global_step``) without importing this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer

HOOKS = (
    "on_fit_start",
    "on_train_epoch_start",
    "on_train_batch_end",
    "on_optimizer_step",
    "on_validation_end",
    "on_train_epoch_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_fit_end",
)


class Callback:
    """Base class; override only the hooks you need. All hooks receive the running Trainer.

    A callback that keeps state across a resume implements ``state_dict``/``load_state_dict``;
    its state is stored in the checkpoint under its name.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch of ``fit()`` (after a resume, before the first remaining epoch)."""

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """Before the first batch of an epoch; ``trainer.epoch`` is the 0-based epoch index."""

    def on_train_batch_end(self, trainer: Trainer, batch_index: int, terms: dict[str, Any]) -> None:
        """After a micro-batch's backward; ``terms`` holds the detached loss terms (tensors: no host sync)."""

    def on_optimizer_step(self, trainer: Trainer) -> None:
        """After each optimizer step; ``trainer.global_step`` already counts it.

        Setting ``trainer.should_stop = True`` here ends training after this step (the epoch is then
        validated and saved as the last one).
        """

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After a validation pass, with its averaged metrics."""

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an epoch's metrics are complete and before they are logged; may add entries to ``metrics``."""

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint is written; may add plain-data entries."""

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """After a checkpoint has been restored."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, also when training stopped early or on an exception."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def has_hooks(obj: Any) -> bool:
    """Whether ``obj`` takes part in the loop as a callback (a :class:`Callback`, or it defines a hook)."""
    return isinstance(obj, Callback) or any(callable(getattr(obj, hook, None)) for hook in HOOKS)


def named_callbacks(callbacks: Sequence[Any] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Callbacks by name (a checkpoint stores each one's state under it): a dict's own names, else class
    names, numbered from the second of a class on (``Recorder``, ``Recorder_2``)."""
    if callbacks is None:
        return {}
    if isinstance(callbacks, Mapping):
        return dict(callbacks)
    named: dict[str, Any] = {}
    for callback in callbacks:
        name, index = type(callback).__name__, 1
        while name in named:
            index += 1
            name = f"{type(callback).__name__}_{index}"
        named[name] = callback
    return named
