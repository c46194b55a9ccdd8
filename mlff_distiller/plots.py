"""Parity plots: predicted against reference values, one panel per quantity (energy, forces, stress, Hessian)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PANELS = (
    ("energy_per_atom", "energy (eV/atom)", "meV/atom"),
    ("forces", "force components (eV/Å)", "meV/Å"),
    ("stress", "stress components (eV/Å³)", "meV/Å³"),
    ("hessian", "Hessian-row entries (eV/Å²)", "meV/Å²"),
)
"""(parity-data name, axis label, unit of the MAE in the panel title), in panel order."""


def parity_plot(
    parity: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    title: str = "",
    reference_label: str = "reference",
    predicted_label: str = "predicted",
    label: str = "",
    overlay: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path | None:
    """Write a PNG with one panel per quantity that ``parity`` holds; None (with a warning) without matplotlib.

    ``parity`` maps ``<name>_reference`` and ``<name>_predicted`` to equal-length arrays (eV units) for the
    names of :data:`PANELS` (e.g. :attr:`mlff_distiller.evaluation.Evaluation.parity`); names absent from it
    get no panel. Each panel's title gives the MAE in meV units. ``overlay`` maps set names to more parity data
    drawn in the same panels in other colours (e.g. the distillation report's fresh frames next to its test
    split), with a legend naming ``parity`` as ``label``; each panel's title then gives each set's MAE.
    """
    present = [panel for panel in PANELS if f"{panel[0]}_reference" in parity and len(parity[f"{panel[0]}_reference"])]
    if not present:
        raise ValueError(f"Nothing to plot: parity holds {sorted(parity)}; expected e.g. forces_reference.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no parity plot (pip install matplotlib).")
        return None
    sets = [(label, parity), *(overlay or {}).items()]
    figure, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 4.2), squeeze=False)
    for axis, (name, axis_label, unit) in zip(axes[0], present):
        errors, low, high = [], np.inf, -np.inf
        for set_name, data in sets:
            if not len(data.get(f"{name}_reference", ())):
                continue
            reference = np.asarray(data[f"{name}_reference"], dtype=np.float64)
            predicted = np.asarray(data[f"{name}_predicted"], dtype=np.float64)
            errors.append((set_name, 1e3 * float(np.abs(predicted - reference).mean())))
            low = min(low, float(min(reference.min(), predicted.min())))
            high = max(high, float(max(reference.max(), predicted.max())))
            axis.scatter(reference, predicted, s=4, alpha=0.5, linewidths=0, label=set_name or None)
        if overlay:
            axis.set_title(f"MAE ({unit}): " + ", ".join(f"{n} {e:.3g}" for n, e in errors), fontsize=9)
            axis.legend(fontsize=8)
        else:
            axis.set_title(f"MAE {errors[0][1]:.3g} {unit}")
        axis.plot([low, high], [low, high], color="0.6", linewidth=1)
        axis.set_xlabel(f"{reference_label} {axis_label}")
        axis.set_ylabel(f"{predicted_label} {axis_label}")
        axis.set_aspect("equal", adjustable="datalim")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
