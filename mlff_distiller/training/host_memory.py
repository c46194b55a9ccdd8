"""How the process's C allocator hands host memory back: a training step frees and re-allocates the same
large tensors every step, and glibc's default gives that memory back to the kernel and faults it in again.

Measured on the light task of ``benchmarks/trainer_overhead.py`` (SchNet 64x3 on small molecules, 1 thread):
~800-1,300 minor page faults per forward/backward and ~15 % of the step's CPU time, gone with a 64 MiB pad;
how many faults a loop takes also depends on what else it keeps on the heap (the Trainer's bookkeeping cost it
~5 % more than a bare loop before), so the pad also makes the Trainer's steps as fast as a bare loop's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TOP_PAD = -2
"""glibc's ``mallopt`` parameter: bytes kept at the top of the heap when it shrinks, and added when it grows."""
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: blocks at least this large get a mapping of their own, unmapped when freed."""
MMAP_THRESHOLD_MAX = 32 << 20
"""The largest threshold glibc accepts on 64-bit; its default rises there by itself as large blocks are freed,
but setting any parameter stops that, so it is set to where it would end."""
_applied: int | None = None


def keep_freed_host_memory(pad_mib: int) -> bool:
    """Let glibc's malloc keep up to ``pad_mib`` MiB of freed heap in the process (``M_TOP_PAD``) instead of
    returning it to the kernel after every step, and serve blocks up to 32 MiB from that heap rather than from
    mappings of their own (``M_MMAP_THRESHOLD``). Process-wide and idempotent; returns whether it is in effect.

    Does nothing (returns False) for ``pad_mib`` 0, off glibc (macOS, musl), or when the environment already
    chose (``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_THRESHOLD_``, or ``GLIBC_TUNABLES`` naming either): a user's
    setting wins.
    """
    global _applied
    if pad_mib <= 0:
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        {"MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ)
        or "top_pad" in tunables
        or "mmap_th" in tunables
    ):
        return False
    if _applied is not None and _applied >= pad_mib:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1 or mallopt(M_TOP_PAD, pad_mib << 20) != 1:
        log.debug("mallopt refused the host memory settings (pad %d MiB); the allocator is left as it is.", pad_mib)
        return False
    _applied = pad_mib
    return True
