"""Checkpoint files and directories: atomic writes, safe loads, model weights, and a run's directory (its lock,
the rotation of its files, the refusal of another run's files and of non-finite weights).

A checkpoint is one plain dict (tensors, numbers, strings, lists, dicts) so that it loads with
``torch.load(weights_only=True)``: no pickled objects, nothing executed on load.

A checkpoint directory holds ``last.pt`` (newest state, possibly mid-epoch), ``previous.pt`` (the
``last.pt`` before it), ``best_model.pt`` and, with ``keep_last``, ``epoch_NNNN.pt``. Every file is
complete at every moment: new content goes to a temporary file that is fsynced and renamed over the
old one, and copies are hard links made the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RESUMABLE_CHANGES, ConfigError, resume_differences

log = logging.getLogger(__name__)

# 2: mid-epoch checkpoints (``epoch_progress``) and a config fingerprint. Version-1 files still load.
FORMAT_VERSION = 2
LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best_model.pt"
EPOCH_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")
_TEMP_PATTERN = re.compile(r"^\.(last|previous|best_model|epoch_\d+)\.pt\..*\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, of an unknown format, or does not fit the model."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], links: Sequence[Path] = ()) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    A crash at any moment leaves either the old complete file or the new complete file, never a torn one.
    ``links`` (e.g. best_model.pt) are made copies of the complete temp file before it becomes ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        for link in links:
            link_checkpoint(Path(tmp), Path(link))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise
    _fsync_dir(path.parent)
    return path


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a complete copy of ``source`` atomically (a hard link; a copy where links fail)."""
    if target.exists() and os.path.samefile(source, target):
        return  # already the same file (renaming a link onto its own inode would be a silent no-op)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(target, error) from error
        raise
    _fsync_dir(target.parent)


def _write_error(path: Path, error: OSError) -> CheckpointError:
    reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "the write failed"
    return CheckpointError(
        f"Could not write checkpoint {str(path)!r}: {reason} ({error}). The partial file was removed and the "
        f"previous {path.name} (if any) is intact; fix the cause and resume from {str(path.parent)!r}."
    )


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Delete temporary files left by writes that a killed process never finished."""
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if _TEMP_PATTERN.match(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def epoch_checkpoints(directory: Path) -> list[Path]:
    """``epoch_NNNN.pt`` files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := EPOCH_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_candidates(directory: Path) -> list[Path]:
    """Checkpoint files of a checkpoint directory, newest state first: last, previous, epochs, best."""
    ordered = [directory / LAST, directory / PREVIOUS, *reversed(epoch_checkpoints(directory)), directory / BEST]
    return [p for p in ordered if p.is_file()]


def load_latest_checkpoint(directory: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[Path, dict[str, Any]]:
    """Load the newest complete checkpoint of a checkpoint directory or of a run directory (its
    ``checkpoints/``). An unreadable file is skipped with a warning naming it; if none can be read,
    the error lists every file tried and why."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir() and not (directory / LAST).is_file():
        directory = directory / "checkpoints"
    candidates = resume_candidates(directory)
    if not candidates:
        raise CheckpointError(
            f"{str(directory)!r} holds no checkpoint (looked for {LAST}, {PREVIOUS}, epoch_NNNN.pt, {BEST})."
        )
    failures = []
    for path in candidates:
        try:
            state = load_checkpoint_file(path, map_location=map_location)
        except CheckpointError as error:
            failures.append(str(error))
            log.warning("%s Falling back to the previous complete checkpoint.", error)
            continue
        if failures:
            log.warning("Resuming from %s instead (%d newer file(s) unreadable).", path, len(failures))
        return path, state
    raise CheckpointError(f"No readable checkpoint in {str(directory)!r}: " + " ".join(failures))


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[Path, dict[str, Any]]:
    """A checkpoint file, or the newest readable checkpoint of a checkpoint or run directory
    (:func:`load_latest_checkpoint`); returns the file read and its state."""
    path = Path(path)
    if path.is_dir():
        return load_latest_checkpoint(path, map_location=map_location)
    return path, load_checkpoint_file(path, map_location=map_location)


def config_fingerprint(config: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """Short hash of the config fields that shape the optimisation (all but ``ignore``)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], source: str, strict: bool) -> None:
    """Refuse (``strict``) or warn about a checkpoint whose training config differs from the current one in a
    field outside ``RESUMABLE_CHANGES`` (the one list of what may change on resume)."""
    differences = resume_differences(saved, current)
    if differences and strict:
        raise CheckpointError(
            f"Checkpoint {source!r} was written with a different training config (fingerprint "
            f"{config_fingerprint(saved, RESUMABLE_CHANGES)}, now {config_fingerprint(current, RESUMABLE_CHANGES)}: "
            + "; ".join(differences)
            + "). Resume with the same config, or pass strict_config=False to accept the change."
        )
    if differences:
        log.warning(
            "Resuming %s with a changed config: %s. The optimizer and scheduler continue from the checkpoint's "
            "state (its learning rates included).",
            source,
            "; ".join(differences),
        )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        # torch's own message may advise loading with weights_only=False, which would run the code a
        # file of unknown origin carries: our message stands alone.
        content = (
            "it is not a PyTorch file, or it holds objects other than tensors and plain data (never unpickled here)"
            if isinstance(error, pickle.UnpicklingError)
            else "it is not a complete PyTorch file"
        )
        raise CheckpointError(
            f"Checkpoint {str(path)!r} could not be read: {content}. It may be truncated, corrupt, or not a "
            "mlff_distiller checkpoint; pass a checkpoint written by mlff-train (checkpoints/best_model.pt, "
            "last.pt) or its run directory."
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"Checkpoint {str(path)!r} is not a mlff_distiller checkpoint (no format_version).")
    if not isinstance(state["format_version"], int) or state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format_version {state['format_version']}; this version of "
            f"mlff_distiller reads format_version <= {FORMAT_VERSION}."
        )
    return state


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict`` with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    error = CheckpointError(
        f"Checkpoint {source!r} does not fit the model: missing keys {missing}, "
        f"unexpected keys {unexpected}, mis-shaped keys {misshaped}."
    )
    if unexpected or misshaped:
        raise error
    try:
        # A model's load hooks may supply keys that older checkpoints lack; anything else still missing fails.
        model.load_state_dict(state_dict)
    except RuntimeError:
        raise error from None


def load_model_weights(model: nn.Module, path: str | os.PathLike[str], use_ema: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``model`` for inference (EMA weights when present and asked for)."""
    state = load_checkpoint_file(path)
    weights = dict(state["model"])
    if use_ema and state.get("ema"):
        weights.update(state["ema"]["shadow"])
    load_model_state(model, weights, str(path))
    return model


def check_finite_weights(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse to write ``path`` when a model or EMA weight of ``state`` is NaN or infinite."""
    tensors = dict(state["model"])
    if state.get("ema"):
        tensors.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    floats = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
        return
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    raise CheckpointError(
        f"Refusing to write checkpoint {str(path)!r}: non-finite values in {bad[:5]}"
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        + ". The previous checkpoint is kept; lower the learning rate or enable grad_clip."
    )


class CheckpointDir:
    """The checkpoint directory of one run: held exclusively while the run writes, never mixed with another
    run's files, and rotated so that the newest complete state is never lost (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], keep_last: int = 0) -> None:
        self.path = Path(path)
        self.keep_last = keep_last

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the directory so that two live runs never write into it."""
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                # lockf (a POSIX record lock), not flock: forked DataLoader workers do not inherit it.
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise ConfigError(
                    f"checkpoint_dir={str(self.path)!r} is in use by another running training process (pid "
                    f"{owner}); two runs must not share a checkpoint directory. Choose another checkpoint_dir, "
                    "or wait for that run to end."
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    def prepare(self, continuing: bool, resumed_from: str | None = None) -> None:
        """Remove the temporary files of writes a killed run never finished; unless the run is ``continuing``
        (resumed, training further, or allowed to overwrite), refuse a directory holding checkpoints. A run
        resumed from a file in another directory brings that run's best model along (:meth:`adopt_best`)."""
        removed = remove_stale_temporaries(self.path)
        if removed:
            log.warning("Removed %d unfinished checkpoint write(s) of a killed run: %s", len(removed), removed)
        if resumed_from is not None and Path(resumed_from).is_file():
            self.adopt_best(Path(resumed_from))
        if continuing:
            return
        existing = [p.name for p in (self.path / LAST, self.path / PREVIOUS, self.path / BEST) if p.exists()]
        existing += [p.name for p in epoch_checkpoints(self.path)]
        if existing:
            raise ConfigError(
                f"checkpoint_dir={str(self.path)!r} already holds {existing} from another run. "
                "Resume it with trainer.load_checkpoint(path) before fit(), choose another checkpoint_dir, "
                "or set overwrite_checkpoints=True."
            )

    def adopt_best(self, resumed_from: Path) -> None:
        """A run resumed from a checkpoint in another directory brings that run's best model along, so that
        the best so far is here even if no later epoch improves on it."""
        source = resumed_from.parent / BEST
        if source.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            link_checkpoint(source, self.path / BEST)

    def write(self, state: dict[str, Any], best: bool, epoch: int | None) -> Path:
        """Write ``state`` as ``last.pt`` (the old one becomes ``previous.pt``), as ``best_model.pt`` when
        ``best``, and as ``epoch_NNNN.pt`` for an epoch end (``epoch``) when ``keep_last``; returns last.pt."""
        last = self.path / LAST
        check_finite_weights(state, last)
        if last.is_file():
            link_checkpoint(last, self.path / PREVIOUS)
        # best_model.pt and epoch_NNNN.pt get the new state before last.pt does: a kill in between
        # leaves last.pt older than them, and the resumed run redoes (and relinks) that epoch.
        links = [self.path / BEST] if best else []
        if epoch is not None and self.keep_last > 0:
            links.append(self.path / f"epoch_{epoch:04d}.pt")
        save_checkpoint(state, last, links=links)
        if epoch is not None and self.keep_last > 0:
            for old in epoch_checkpoints(self.path)[: -self.keep_last]:  # only after the new one is complete
                old.unlink(missing_ok=True)
        return last
