"""Evaluate a trained student on labelled structures: exact metrics, per-structure predictions, parity data.

:func:`evaluate_structures` is the Python API behind ``mlff-eval``; it needs no Trainer. Its metrics are
those the Trainer reports for a split (same names, same units, same exact (total, count) reduction of
:func:`~mlff_distiller.losses.energy_force.error_metrics`), so evaluating a run's best checkpoint on its test
structures reproduces ``mlff-train``'s ``test/...`` figures. :func:`load_student` rebuilds the student of an
``mlff-train`` run from a checkpoint file or run directory.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .data import keys
from .data.batch import collate_atoms
from .data.dataset import AtomsDataset, DataError, attach_labels, keep_stress_if_all_have_it, metric_groups_of
from .losses.energy_force import error_metrics
from .losses.hessian import row_slots, student_hessian_entries
from .training.metrics import Mean, MetricSums

log = logging.getLogger(__name__)

LABEL_PREFIX = "label_"
"""Prefix of the reference values in written predictions (``info["label_energy"]``, ``arrays["label_forces"]``)."""
PREDICTED_PREFIX = "predicted_"
"""Prefix of the student's values in written predictions (``info["predicted_energy"]``, ...)."""
_PRIVATE = ("_energy", "_stress", "_hessian_row_coord", "_hessian_rows")


@dataclass
class Evaluation:
    """What :func:`evaluate_structures` returns."""

    metrics: dict[str, float]
    """Exact metrics over all structures, without a split prefix: ``energy_mae_per_atom``,
    ``energy_rmse_per_atom`` (meV/atom), ``force_mae``, ``force_rmse`` (meV/Å), ``stress_mae`` (meV/Å³, when
    every structure has a stress), ``hessian_mae`` (meV/Å², when structures carry Hessian rows),
    ``force_mae/<element>``, ``energy_mae_per_atom/<group>`` and ``force_mae/<group>`` (``<group>`` e.g.
    ``config_type=md_600K``), and ``num_structures``, ``num_atoms``, ``force_std`` (meV/Å: the standard deviation
    of the reference force components) and ``force_mae_rel`` (``force_mae / force_std``: the error in units of
    the forces' own spread, which the distillation targets and bounds use)."""
    parity: dict[str, np.ndarray] = field(repr=False)
    """``<name>_reference`` and ``<name>_predicted`` for ``energy_per_atom`` (eV/atom), ``forces`` (eV/Å,
    components), ``stress`` (eV/Å³, components) and ``hessian`` (eV/Å², entries) when present; for
    :func:`mlff_distiller.plots.parity_plot`."""
    structures: list[Any] = field(repr=False)
    """Copies of the evaluated structures holding labels and predictions side by side: ``info`` entries
    ``label_energy`` / ``predicted_energy`` (eV) and ``label_stress`` / ``predicted_stress`` (Voigt, eV/Å³),
    ``arrays`` entries ``label_forces`` / ``predicted_forces`` (eV/Å); no calculator attached."""

    def write_predictions(self, path: str | os.PathLike[str]) -> Path:
        """Write :attr:`structures` as extended XYZ (readable with ``ase.io.read(path, ":")``)."""
        import ase.io

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(path, self.structures, format="extxyz")
        return path


class LoadedStudent(NamedTuple):
    """A student rebuilt from a checkpoint by :func:`load_student`."""

    model: nn.Module
    path: Path
    """The checkpoint file read."""
    ema: bool
    """Whether its weights are the EMA weights."""


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file to evaluate: ``path`` itself, or in a run / checkpoint directory its
    ``best_model.pt`` (the model ``mlff-train`` tests), else its newest readable checkpoint (with a warning)."""
    from .training.checkpoint import CheckpointError, read_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} does not exist; pass a run directory of mlff-train or a checkpoint file "
            "(checkpoints/best_model.pt, last.pt)."
        )
    if not path.is_dir():
        return path
    for candidate in (path / "checkpoints" / "best_model.pt", path / "best_model.pt"):
        if candidate.is_file():
            return candidate
    found, _ = read_checkpoint(path)
    log.warning("%s has no best_model.pt; evaluating its newest checkpoint, %s.", path, found)
    return found


def load_student(path: str | os.PathLike[str], use_ema: bool = True) -> LoadedStudent:
    """Rebuild the student an ``mlff-train`` checkpoint describes and load its weights (EMA weights when the
    run kept them and ``use_ema``). ``path``: a checkpoint file or a run directory (:func:`resolve_checkpoint`)."""
    from hydra.utils import instantiate

    from .training.checkpoint import CheckpointError, load_checkpoint_file, load_model_state

    file = resolve_checkpoint(path)
    state = load_checkpoint_file(file)
    model_config = state.get("config", {}).get("extra", {}).get("model_config")
    if model_config is None:
        raise CheckpointError(
            f"Checkpoint {str(file)!r} does not describe its model (no model_config): it was not written by "
            "mlff-train. Build the model yourself, load its weights (training.load_model_weights) and pass it to "
            "StudentCalculator(model), StudentPotential(model) or evaluate_structures(model, ...)."
        )
    model = instantiate(model_config)
    weights = dict(state["model"])
    ema = bool(use_ema and state.get("ema"))
    if ema:
        weights.update(state["ema"]["shadow"])
    load_model_state(model, weights, str(file))
    return LoadedStudent(model, file, ema)


def check_trained_elements(model: nn.Module, structures: Sequence[Any], source: str = "the structures") -> None:
    """Raise :class:`~mlff_distiller.models.base.UnknownElementError` naming the unknown elements, the known
    ones and the first structures holding them, when ``structures`` hold elements ``model`` was not trained on."""
    known = set(getattr(model, "elements", []) or [])
    if not known or not hasattr(model, "check_elements"):
        return
    offending = [index for index, atoms in enumerate(structures) if not set(atoms.numbers.tolist()) <= known]
    if offending:
        shown = ", ".join(map(str, offending[:5])) + (" ..." if len(offending) > 5 else "")
        where = f"{source} (structure{'s' if len(offending) > 1 else ''} {shown} of {len(structures)})"
        model.check_elements(np.concatenate([structures[i].numbers for i in offending]), where=where)


def evaluate_structures(
    model: nn.Module,
    structures: Sequence[Any],
    batch_size: int = 16,
    metric_groups_key: str | None = "config_type",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "the structures",
) -> Evaluation:
    """Predict energies, forces (and stress, Hessian rows) of labelled ``structures`` with ``model`` and
    compare them with the labels.

    Args:
        model: an atomistic student (has ``cutoff``); not modified (a frozen copy is evaluated).
        structures: ASE ``Atoms`` with labels: the ``_energy`` / ``_forces`` entries of
            :func:`~mlff_distiller.data.dataset.read_labelled_structures`, or an attached calculator (its
            stored results; a live calculator computes them, e.g. a teacher). Hessian rows stored as in
            :mod:`mlff_distiller.data.keys` are compared too; stress when every structure has one.
        batch_size: structures per forward pass (the metrics do not depend on it).
        metric_groups_key: ``atoms.info`` key whose values also get their own metrics (None: none).
        device, dtype: where and in which precision to evaluate (dtype None: the model's).
        source: how errors name the structures (e.g. the file they came from).

    Raises :class:`~mlff_distiller.models.base.UnknownElementError` for elements the student was not
    trained on and :class:`~mlff_distiller.data.dataset.DataError` for unusable structures, before any work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if not structures:
        raise DataError(f"{source} holds no structures to evaluate.")
    if not hasattr(model, "cutoff"):
        raise TypeError(f"{type(model).__name__} has no 'cutoff': evaluate_structures needs an atomistic student.")
    check_trained_elements(model, structures, source)
    labelled = [_labelled(atoms, f"structure {number} of {source}") for number, atoms in enumerate(structures)]
    keep_stress_if_all_have_it(labelled)
    device = torch.device(device)
    student = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    dtype = next(student.parameters()).dtype
    names, groups = metric_groups_of(labelled, metric_groups_key)
    dataset = AtomsDataset(
        labelled, model.cutoff, source=source, metric_groups=groups if names else None, dtype=dtype
    )  # geometry built in the evaluation precision
    if hasattr(student, "compute_stress"):
        student.compute_stress = "_stress" in labelled[0].info

    sums = MetricSums()
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate_atoms(dataset.graphs[start : start + batch_size]).to(device, dtype)
        with_rows = keys.HESSIAN_ROWS in batch and batch[keys.HESSIAN_ROW_COORD].numel() > 0
        positions = batch[keys.POSITIONS].detach().requires_grad_(with_rows)
        batch = batch.replace(**{keys.POSITIONS: positions})
        predicted = student(batch)
        terms: dict[str, Any] = dict(error_metrics(predicted, batch, names or None, per_element=True))
        if with_rows:
            structure_of_row = batch[keys.BATCH][batch[keys.HESSIAN_ROW_COORD] // 3]
            slots = row_slots(structure_of_row, structure_of_row.shape[0], None)
            entries = student_hessian_entries(
                predicted[keys.FORCES], positions, batch, slots, int(slots.max()) + 1, create_graph=False
            ).detach()
            reference = batch[keys.HESSIAN_ROWS]
            absolute = (entries - reference).double().abs()
            terms["hessian_mae"] = Mean(1e3 * absolute.sum(), absolute.new_tensor(float(absolute.numel())))
            _collect(collected, "hessian", entries, reference)
        sums.add(terms, len(batch))
        _collect(collected, "energy", predicted[keys.ENERGY], batch[keys.ENERGY])
        _collect(collected, "forces", predicted[keys.FORCES], batch[keys.FORCES])
        if keys.STRESS in batch and keys.STRESS in predicted:
            _collect(collected, "stress", predicted[keys.STRESS], batch[keys.STRESS])

    label_forces = torch.cat(collected["forces_reference"])
    metrics = sums.compute()
    metrics["num_structures"] = float(len(labelled))
    metrics["num_atoms"] = float(label_forces.shape[0])
    # The spread of the reference force components (population std): the scale force errors are judged on.
    force_std = 1e3 * float(label_forces.reshape(-1).std(correction=0))
    metrics["force_std"] = force_std
    metrics["force_mae_rel"] = metrics["force_mae"] / force_std if force_std > 0 else float("nan")
    return Evaluation(metrics, _parity(collected, labelled), _with_predictions(labelled, collected))


def _labelled(atoms: Any, where: str) -> Any:
    """A copy of ``atoms`` with the ``_energy`` / ``_forces`` (/ stress, Hessian rows) entries checked and set."""
    out = atoms.copy()  # Atoms.copy leaves the calculator behind
    if "_energy" in atoms.info and "_forces" in atoms.arrays:
        return out
    out.calc = atoms.calc
    if atoms.calc is not None and "energy" not in atoms.calc.results:
        atoms.get_potential_energy(), atoms.get_forces()  # a live calculator (a teacher) labels it now
    attach_labels(out, where)
    out.calc = None
    return out


def _collect(collected: dict[str, list[torch.Tensor]], name: str, predicted: torch.Tensor, reference: Any) -> None:
    collected.setdefault(f"{name}_predicted", []).append(predicted.detach().to("cpu", torch.float64))
    collected.setdefault(f"{name}_reference", []).append(reference.detach().to("cpu", torch.float64))


def _parity(collected: dict[str, list[torch.Tensor]], labelled: Sequence[Any]) -> dict[str, np.ndarray]:
    """Flat reference / predicted arrays; energies per atom."""
    parity = {name: torch.cat(parts).reshape(-1).numpy() for name, parts in collected.items()}
    atoms = np.array([len(a) for a in labelled], dtype=np.float64)
    for side in ("reference", "predicted"):
        parity[f"energy_per_atom_{side}"] = parity.pop(f"energy_{side}") / atoms
    return parity


def _with_predictions(labelled: Sequence[Any], collected: dict[str, list[torch.Tensor]]) -> list[Any]:
    """Copies of the structures with labels and predictions in ``info`` / ``arrays`` (see :class:`Evaluation`)."""
    energies = torch.cat(collected["energy_predicted"]).numpy()
    forces = torch.cat(collected["forces_predicted"]).numpy()
    stresses = torch.cat(collected["stress_predicted"]).numpy() if "stress_predicted" in collected else None
    out, start = [], 0
    for index, atoms in enumerate(labelled):
        atoms = atoms.copy()
        atoms.calc = None
        atoms.info[f"{LABEL_PREFIX}energy"] = float(atoms.info["_energy"])
        atoms.info[f"{PREDICTED_PREFIX}energy"] = float(energies[index])
        atoms.arrays[f"{LABEL_PREFIX}forces"] = np.asarray(atoms.arrays["_forces"], dtype=np.float64)
        atoms.arrays[f"{PREDICTED_PREFIX}forces"] = forces[start : start + len(atoms)].copy()
        if stresses is not None:
            atoms.info[f"{LABEL_PREFIX}stress"] = _voigt(np.asarray(atoms.info["_stress"]))
            atoms.info[f"{PREDICTED_PREFIX}stress"] = _voigt(stresses[index])
        for key in _PRIVATE:
            atoms.info.pop(key, None)
        del atoms.arrays["_forces"]
        start += len(atoms)
        out.append(atoms)
    return out


def _voigt(stress: np.ndarray) -> np.ndarray:
    """3x3 -> ASE's Voigt order xx, yy, zz, yz, xz, xy."""
    s = np.asarray(stress, dtype=np.float64).reshape(3, 3)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
