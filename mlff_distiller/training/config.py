"""`TrainingConfig`: the typed, validated description of one training run.

It is a plain dataclass so that Python users construct it directly and Hydra uses it as a
structured-config schema (OmegaConf checks types; ``__post_init__`` checks values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULERS = ("cosine", "step", "plateau", "none")
MIXED_PRECISION = ("off", "bf16", "fp16")
MODES = ("min", "max")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
SCHEDULER_INTERVALS = ("epoch", "step")
SCHEDULER_HORIZONS = ("max_epochs", "max_time")

# Fields that may differ between an interrupted run and its continuation (``Trainer.load_state_dict``,
# ``mlff-train ckpt_path=...``): how long to train, where and how often to write, when to stop early.
# Any other difference changes the optimisation itself and is refused unless explicitly allowed.
RESUMABLE_CHANGES = frozenset(
    {
        "max_epochs",
        "max_time",
        "checkpoint_dir",
        "overwrite_checkpoints",
        "log_interval",
        "val_interval",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "max_nonfinite_steps",
        "keep_last",
        "checkpoint_every_n_steps",
        "handle_signals",
        "device",
        "keep_freed_memory",
        "extra",
    }
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is accepted."""


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"TrainingConfig.{name}={value!r} is invalid: {name} must be {accepted}.")


@dataclass
class TrainingConfig:
    """Everything the :class:`~mlff_distiller.training.Trainer` needs besides model, data and loss.

    Every field is validated at construction; an invalid value raises :class:`ConfigError`.
    """

    max_epochs: int = 100
    """Number of passes over the training data."""
    max_time: Optional[float] = None
    """Wall-clock budget in seconds (all of ``fit()``: training, validation, checkpoints; summed over resumed
    runs). Once spent, training stops after the current optimizer step: that epoch is validated, saved and
    counted as the last one. None: no limit."""
    batch_size: int = 32
    """Structures per batch; used by data builders (the Trainer warns when its loader disagrees)."""
    learning_rate: float = 1e-3
    """Peak learning rate (after warmup)."""
    optimizer: Optional[str] = "adam"
    """One of ``adam``, ``adamw``, ``sgd``; None when the optimizer is passed to the Trainer (as the CLI does)."""
    weight_decay: float = 0.0
    """L2 penalty (adam, sgd) or decoupled weight decay (adamw)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    lr_scheduler: Optional[str] = "none"
    """One of ``cosine``, ``step``, ``plateau``, ``none``; None when the scheduler is passed to the Trainer."""
    scheduler_interval: str = "epoch"
    """When cosine/step schedulers advance: once per ``epoch`` or per optimizer ``step``."""
    scheduler_horizon: str = "max_epochs"
    """What a cosine schedule anneals over: ``max_epochs`` (that many epochs, or their optimizer steps with
    ``scheduler_interval='step'``) or ``max_time`` (the share of the time budget spent, read at every
    interval; the learning rate then depends on the machine's speed)."""
    step_size: int = 30
    """Step scheduler: multiply the learning rate by ``gamma`` every ``step_size`` intervals."""
    gamma: float = 0.1
    """Step scheduler decay factor."""
    plateau_factor: float = 0.5
    """Plateau scheduler: factor applied to the learning rate when the monitored metric stalls."""
    plateau_patience: int = 10
    """Plateau scheduler: the learning rate is reduced after more than this many validations without
    improvement (``torch.optim.lr_scheduler.ReduceLROnPlateau`` semantics)."""
    min_lr: float = 0.0
    """Lower bound of the learning rate for cosine (its final value) and plateau."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps, from ``learning_rate / warmup_steps`` up."""
    grad_clip: Optional[float] = None
    """Clip the total gradient norm to this value (None: no clipping)."""
    grad_clip_value: Optional[float] = None
    """Clip each gradient element to [-value, value] (None: no clipping)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed (loss averaged) before one optimizer step."""
    mixed_precision: str = "off"
    """``off`` (float32), ``bf16`` (CPU or CUDA autocast) or ``fp16`` (CUDA autocast + GradScaler)."""
    checkpoint_dir: Optional[str] = "checkpoints"
    """Where ``last.pt`` and ``best_model.pt`` are written (None: no checkpoints)."""
    overwrite_checkpoints: bool = False
    """Allow a fresh run to replace checkpoints already in ``checkpoint_dir``."""
    keep_last: int = 0
    """Also keep the checkpoints of the last this many epochs as ``epoch_NNNN.pt`` (0: none)."""
    checkpoint_every_n_steps: Optional[int] = None
    """Also write ``last.pt`` every this many optimizer steps inside an epoch (None: at epoch ends only)."""
    handle_signals: bool = True
    """On SIGTERM/SIGINT finish the optimizer step, write a mid-epoch ``last.pt`` and raise
    ``TrainingInterrupted`` (exit code 143/130 on the command line); a second SIGINT aborts at once."""
    log_interval: int = 10
    """Log the step loss and learning rate every this many optimizer steps."""
    val_interval: int = 1
    """Validate every this many epochs (and always after the last epoch)."""
    monitor: str = "val/loss"
    """Metric used for best-model selection, early stopping and the plateau scheduler."""
    mode: str = "min"
    """``min`` if a lower monitored value is better, ``max`` otherwise."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many validations without improvement (None: never stop early)."""
    early_stopping_min_delta: float = 0.0
    """An improvement must beat the best value by more than this to reset the patience counter."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay (None: off)."""
    ema_warmup: bool = True
    """Ramp the EMA decay as ``min(decay, (1 + n) / (10 + n))`` over the first updates."""
    max_nonfinite_steps: int = 10
    """Non-finite loss/gradient steps are skipped; this many in a row stop the run with an error."""
    seed: Optional[int] = 0
    """Seed for torch/python/numpy RNGs at the start of a fresh run (None: do not seed)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; the Trainer's ``device`` argument wins."""
    keep_freed_memory: bool = True
    """From ``fit()`` on, glibc's malloc keeps freed host memory in the process instead of returning it to the
    kernel and faulting it in again every step (5-15 % of a CPU step; :func:`mlff_distiller.memory.keep_freed_memory`).
    Process-wide; false leaves the allocator alone, as do non-glibc platforms and ``MALLOC_*`` settings."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Free-form values carried into the checkpoint (e.g. the CLI's run metadata)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first invalid field."""
        positive_ints = (
            "max_epochs",
            "batch_size",
            "log_interval",
            "val_interval",
            "gradient_accumulation_steps",
            "step_size",
            "max_nonfinite_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        for name in ("warmup_steps", "plateau_patience", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "an integer >= 0")
        if self.checkpoint_every_n_steps is not None and (
            isinstance(self.checkpoint_every_n_steps, bool)
            or not isinstance(self.checkpoint_every_n_steps, int)
            or self.checkpoint_every_n_steps < 1
        ):
            _fail("checkpoint_every_n_steps", self.checkpoint_every_n_steps, "an integer >= 1 or None")
        if self.early_stopping_patience is not None and (
            isinstance(self.early_stopping_patience, bool)
            or not isinstance(self.early_stopping_patience, int)
            or self.early_stopping_patience < 0
        ):
            _fail("early_stopping_patience", self.early_stopping_patience, "an integer >= 0 or None")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            _fail("learning_rate", self.learning_rate, "a finite number > 0")
        for name in ("weight_decay", "momentum", "min_lr", "early_stopping_min_delta"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                _fail(name, value, "a finite number >= 0")
        if self.min_lr > self.learning_rate:
            _fail("min_lr", self.min_lr, f"<= learning_rate ({self.learning_rate})")
        for name in ("gamma", "plateau_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < 1:
                _fail(name, value, "a number in (0, 1)")
        for name in ("grad_clip", "grad_clip_value"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                _fail(name, value, "a number > 0 or None")
        if self.max_time is not None and (not _is_number(self.max_time) or self.max_time <= 0):
            _fail("max_time", self.max_time, "a number of seconds > 0 or None")
        if self.ema_decay is not None and (not _is_number(self.ema_decay) or not 0 < self.ema_decay < 1):
            _fail("ema_decay", self.ema_decay, "a number in (0, 1) or None")
        choices = {
            "optimizer": OPTIMIZERS,
            "lr_scheduler": LR_SCHEDULERS,
            "scheduler_interval": SCHEDULER_INTERVALS,
            "scheduler_horizon": SCHEDULER_HORIZONS,
            "mixed_precision": MIXED_PRECISION,
            "mode": MODES,
        }
        for name, accepted in choices.items():
            value = getattr(self, name)
            if value is None and name in ("optimizer", "lr_scheduler"):
                continue
            if value not in accepted:
                _fail(
                    name,
                    value,
                    "one of "
                    + ", ".join(repr(a) for a in accepted)
                    + (" or None (given to the Trainer)" if name in ("optimizer", "lr_scheduler") else ""),
                )
        if self.scheduler_horizon == "max_time" and self.max_time is None:
            _fail(
                "scheduler_horizon",
                self.scheduler_horizon,
                "'max_epochs' when max_time is None (no budget to anneal over)",
            )
        if self.nesterov and self.optimizer == "sgd" and self.momentum <= 0:
            _fail("nesterov", self.nesterov, "False when momentum is 0")
        if not isinstance(self.monitor, str) or "/" not in self.monitor and self.monitor != "lr":
            _fail("monitor", self.monitor, "a metric name with a split prefix, e.g. 'val/loss' or 'train/loss'")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            _fail("seed", self.seed, "an integer or None")
        if not _valid_device(self.device):
            _fail("device", self.device, "one of " + ", ".join(repr(d) for d in DEVICES))
        if self.mixed_precision == "fp16" and self.device == "cpu":
            _fail(
                "mixed_precision",
                self.mixed_precision,
                "'off' or 'bf16' on a CPU (fp16 autocast with GradScaler needs CUDA)",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for checkpoints and logs)."""
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, config: TrainingConfig | dict[str, Any] | None) -> TrainingConfig:
        """``config`` itself, one built from a mapping of fields, or the defaults for None."""
        if config is None:
            return cls()
        if isinstance(config, Mapping):
            return cls.from_dict(dict(config))
        if not isinstance(config, cls):
            raise ConfigError(
                f"config must be a TrainingConfig or a mapping of its fields, not {type(config).__name__}."
            )
        return config

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value."""
        return {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build from a mapping, rejecting unknown keys with the list of accepted ones."""
        check_known_fields(cls, values, "TrainingConfig field", ConfigError)
        return cls(**values)


def check_known_fields(
    schema: type, options: Mapping[str, Any], what: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` naming every key of ``options`` that is not a field of the dataclass ``schema``, and the
    accepted ones (``what``: how the message calls a key, e.g. ``"distill option"``)."""
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise error(f"Unknown {what}s {unknown}; accepted: {sorted(names)}.")


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: checkpoint X, now Y"`` for every field outside :data:`RESUMABLE_CHANGES` that differs between
    a saved config (``TrainingConfig.to_dict()``) and the current one; a field the saved run did not have yet
    counts as its default."""
    saved = {**TrainingConfig.defaults(), **saved}
    return [
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if name not in RESUMABLE_CHANGES and saved.get(name) != current.get(name)
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_device(device: Any) -> bool:
    if not isinstance(device, str):
        return False
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()
