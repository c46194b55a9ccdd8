"""Process-wide memory setting for CPU runs: reuse freed tensor memory instead of returning it to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above 32 MB (its largest
``mmap`` threshold) with a fresh ``mmap`` and unmaps it on ``free``, so each new large tensor is
faulted in page by page, zeroed by the kernel. A PaiNN student's (edges, 3, 64) messages pass 32 MB
at about 700 atoms (or a training batch of 32 x 32 atoms): at 2048 atoms its energy+forces call
spent as much time in the kernel as in its own arithmetic (the 1.7x rise in time per atom from 256
to 2048 atoms), and a default-batch PaiNN training step nearly doubled its CPU time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1
"""Free memory (bytes) kept at the top of the heap before any is given back: mallopt's largest value."""

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = ("trim_threshold", "top_pad", "mmap_threshold", "mmap_max")

_applied: bool | None = None


def user_chose_malloc_settings() -> bool:
    """Whether the environment sets glibc's malloc parameters (``MALLOC_*_`` or ``GLIBC_TUNABLES``)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in _USER_SETTINGS) or any(name in tunables for name in _USER_TUNABLES)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep large freed blocks for reuse (no ``mmap``; heap trimmed only past 2 GB).

    The process then holds its peak memory until it exits, as a caching allocator does; in exchange,
    repeated large tensors (a student's calls in MD, training steps) cost no page faults. Call it
    once at start-up; later calls do nothing. Returns whether the setting is in effect: False (and
    nothing changed) where the C library is not glibc (macOS, Windows, musl) or where the environment set
    malloc's parameters itself (:func:`user_chose_malloc_settings`: a user's choice wins).

    Besides large tensors, a training step's smaller freed blocks stay on the heap too instead of being
    trimmed and faulted in again (measured: 800-23,000 minor faults per step otherwise,
    ``benchmarks/trainer_overhead.py``).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if user_chose_malloc_settings():
        log.debug("keep_freed_memory: malloc settings come from the environment; left alone")
        return _applied
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
        if libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
            _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO) == 1
    log.debug("keep_freed_memory: %s", "on" if _applied else "not available (not glibc)")
    return _applied
