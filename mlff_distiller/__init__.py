"""mlff_distiller: train small, fast machine-learning force fields and distill foundation models into them.

The package root imports nothing heavy (no torch) so that ``mlff-train --help`` stays fast.
"""

__version__ = "0.1.0"

from typing import Any


def __getattr__(name: str) -> Any:
    # StudentCalculator pulls in torch and ASE; load it on first use only.
    if name == "StudentCalculator":
        from .calculator import StudentCalculator

        return StudentCalculator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
