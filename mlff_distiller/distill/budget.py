"""Teacher calls: the currency of distillation. One energy + forces (+ stress) evaluation is one call.

A structure labelled with Hessian rows by finite differences cost two more calls per row. Labelling that
records its own count (``atoms.info["teacher_calls"]``, e.g. an autograd Hessian that costs no extra
forward pass) is taken at its word.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..data import keys

CALLS_INFO_KEY = "teacher_calls"
"""``atoms.info`` key of a structure's own teacher-call count, when its labelling recorded one."""


def teacher_calls(atoms: Any) -> int:
    """Teacher calls that labelling ``atoms`` cost (see the module docstring)."""
    if CALLS_INFO_KEY in atoms.info:
        return int(atoms.info[CALLS_INFO_KEY])
    rows = atoms.info.get(keys.HESSIAN_ROW_INDEX_INFO)
    return 1 + 2 * (len(np.atleast_1d(rows)) if rows is not None else 0)


def total_teacher_calls(structures: Iterable[Any]) -> int:
    """Sum of :func:`teacher_calls` over ``structures``."""
    return sum(teacher_calls(atoms) for atoms in structures)
