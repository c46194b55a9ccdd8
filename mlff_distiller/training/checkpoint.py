"""Checkpoint files: atomic writes, safe loads, RNG capture, and model-weight loading for inference.

A checkpoint is one plain dict (tensors, numbers, strings, lists, dicts) so that it loads with
``torch.load(weights_only=True)``: no pickled objects, nothing executed on load.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, of an unknown format, or does not fit the model."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    A crash at any moment leaves either the old complete file or the new complete file, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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
        raise CheckpointError(
            f"Checkpoint {str(path)!r} could not be read ({type(error).__name__}: {error}). "
            "It may be truncated, corrupt, or not a mlff_distiller checkpoint."
        ) from error
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"Checkpoint {str(path)!r} is not a mlff_distiller checkpoint (no format_version).")
    if state["format_version"] > FORMAT_VERSION:
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
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"Checkpoint {source!r} does not fit the model: missing keys {missing}, "
            f"unexpected keys {unexpected}, mis-shaped keys {misshaped}."
        )
    model.load_state_dict(state_dict)


def load_model_weights(model: nn.Module, path: str | os.PathLike[str], use_ema: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``model`` for inference (EMA weights when present and asked for)."""
    state = load_checkpoint_file(path)
    weights = dict(state["model"])
    if use_ema and state.get("ema"):
        weights.update(state["ema"]["shadow"])
    load_model_state(model, weights, str(path))
    return model


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG the training loop draws from, as plain data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {
        "name": name,
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value
