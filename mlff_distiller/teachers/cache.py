"""The on-disk cache of teacher-labelled datasets (and of the active loop's state), keyed by configuration.

A cached item is named ``<cache_dir>/<name>_<hash12>.<suffix>`` where the hash covers a canonical JSON
form of every setting that changes the result (:func:`canonical`, :func:`cache_key`). A dataset file is
complete only once its JSON sidecar (the configuration, size and SHA-256) is written and the finished
file renamed into place (:func:`commit_dataset`); :func:`build_once` serialises concurrent builders of
the same item with a file lock. Labelling teachers is expensive, so every builder resumes from its
partial files after an interruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/mlff_distiller/datasets``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlff_distiller" / "datasets"


def jsonable(value: Any) -> Any:
    """``json.dumps`` default for configurations: numpy scalars, mappings (e.g. OmegaConf) and sequences."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if hasattr(value, "items"):  # e.g. an OmegaConf DictConfig
        return dict(value.items())
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return list(value)
    raise TypeError(f"{value!r} cannot be part of a dataset configuration (it must be JSON-serialisable).")


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` after a JSON round trip: tuples become lists, so a hash depends on values, not on types."""
    return json.loads(json.dumps(config, sort_keys=True, default=jsonable))


def cache_key(config: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``config`` as sorted JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def file_tag(text: Any) -> str:
    """``text`` as a file-name part: lower case, anything but letters and digits as ``_``."""
    return "".join(c if c.isalnum() else "_" for c in str(text).lower())


def cache_files(cache_dir: str | os.PathLike[str] | None, name: str, config: dict) -> tuple[Path, Path]:
    """A cached set's file and JSON sidecar: ``<cache_dir>/<name>_<hash12>.{extxyz,json}``, hashing ``config``."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"{name}_{cache_key(config)}"
    return directory / f"{stem}.extxyz", directory / f"{stem}.json"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_structures_atomic(path: Path, structures: list[Any]) -> None:
    """Write structures as extended XYZ, atomically (a reader sees the old file or the whole new one)."""
    import io

    import ase.io

    buffer = io.StringIO()
    if structures:
        ase.io.write(buffer, structures, format="extxyz")
    write_text_atomic(path, buffer.getvalue())


def commit_dataset(partial: Path, path: Path, sidecar: Path, **meta: Any) -> None:
    """Write the JSON sidecar (``meta`` plus the file's size and hash), then rename the finished
    ``partial`` file to ``path``: the final name appears only for a complete set."""
    meta.update(file=path.name, bytes=partial.stat().st_size, sha256=sha256_file(partial))
    write_text_atomic(sidecar, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; the atomic rename still protects the result
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def build_once(path: Path, sidecar: Path, config: dict, progress: bool) -> Iterator[bool]:
    """Yields True while the caller holds the set's lock and must build it; False when a complete cached
    set is there (also when another process finished it while this one waited for the lock)."""
    if not is_complete(path, sidecar, config):
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.with_suffix(".lock")):
            if not is_complete(path, sidecar, config):
                yield True
                return
    announce(f"Using cached dataset {path}", progress)
    yield False


def is_complete(path: Path, sidecar: Path, config: dict) -> bool:
    """Whether ``path`` is a committed set of ``config`` (sidecar present, same config, same size)."""
    if not (path.exists() and sidecar.exists()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("config") != config or meta.get("bytes") != path.stat().st_size:
        log.warning("%s does not match its sidecar %s; rebuilding it.", path, sidecar)
        return False
    return True


def announce(message: str, progress: bool) -> None:
    """Log ``message``, and print it on stderr when ``progress``, unless the log already reaches the console
    (a command line): then it is said once."""
    log.info(message)
    if progress and not _logging_to_console():
        print(message, file=sys.stderr, flush=True)


def _logging_to_console() -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        for h in logging.getLogger().handlers
    )
