"""mlff_distiller: train small, fast machine-learning force fields and distill foundation models into them.

The package root imports nothing heavy (no torch) so that ``mlff-train --help`` stays fast.
"""

__version__ = "0.1.0"
