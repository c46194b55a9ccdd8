"""Label structures with a teacher, chunk by chunk, into a resumable extended-XYZ file.

Every chunk is appended, flushed and fsynced before the next one starts, so an interrupted job keeps what
it finished. Rerunning with the same structures and output computes only the rest: the frames already in
the file must be the requested structures' prefix (same elements, cell, pbc and positions), and a frame
torn by a kill mid-write is cut off first. Labels are stored the way ASE reads them back as a
``SinglePointCalculator``: ``ase.io.read(path, ":")[i].get_potential_energy()`` / ``.get_forces()``.
Optional Hessian rows (for distillation) are computed with a structure's other labels and stored with it
(:mod:`.hessian`), so they are cached and resumed alike.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import keys
from .hessian import DEFAULT_DELTA

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

POSITION_TOLERANCE = 1e-6
"""Å; stored frames keep 8 decimals, so a resumed prefix must match the requested positions to this."""

_RESULT_KEYS = ("energy", "free_energy", "forces", "stress", "energies", "stresses", "magmom", "magmoms")


class NonFiniteLabelError(ValueError):
    """The teacher returned a NaN or infinite energy or force."""


class LabelFileMismatchError(ValueError):
    """An existing output file does not hold a prefix of the requested structures."""


def complete_frames(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Scan an extended-XYZ file: (complete frames, byte offset where they end, file size).

    A frame is complete when its atom-count line, comment line and all its atom lines are present, each
    ending in a newline. Bytes after the last complete frame are a torn (partially written) frame.
    Raises ``ValueError`` if a full line where an atom count belongs is not an integer.
    """
    data = Path(path).read_bytes()
    frames = end = position = 0
    size = len(data)
    while position < size:
        newline = data.find(b"\n", position)
        if newline < 0:
            break  # torn count line
        header = data[position:newline].strip()
        try:
            n_atoms = int(header)
        except ValueError:
            raise ValueError(
                f"{path}: line at byte {position} should be an atom count, found {header[:60]!r}; "
                "this is not an extended-XYZ file written by label_structures."
            ) from None
        cursor = newline + 1
        for _ in range(n_atoms + 1):  # comment line + atom lines
            newline = data.find(b"\n", cursor)
            if newline < 0:
                break
            cursor = newline + 1
        else:
            frames += 1
            end = position = cursor
            continue
        break
    return frames, end, size


def _same_structure(stored: Atoms, wanted: Atoms) -> str | None:
    """Why ``stored`` is not ``wanted`` (None if it is)."""
    if len(stored) != len(wanted):
        return f"{len(stored)} atoms stored, {len(wanted)} requested"
    if not np.array_equal(stored.numbers, wanted.numbers):
        return "different elements"
    if not np.array_equal(stored.pbc, wanted.pbc):
        return "different periodicity"
    if not np.allclose(stored.cell.array, wanted.cell.array, atol=POSITION_TOLERANCE, rtol=0):
        return "different cell"
    deviation = float(np.abs(stored.positions - wanted.positions).max()) if len(wanted) else 0.0
    if deviation > POSITION_TOLERANCE:
        return f"positions differ by up to {deviation:.3g} Å"
    return None


def _same_hessian_rows(stored: Atoms, wanted: int) -> str | None:
    """Why ``stored`` does not carry ``wanted`` Hessian rows (None if it does)."""
    has_rows = keys.HESSIAN_ROWS_ARRAY in stored.arrays and keys.HESSIAN_ROW_INDEX_INFO in stored.info
    count = len(np.atleast_1d(stored.info[keys.HESSIAN_ROW_INDEX_INFO])) if has_rows else 0
    return None if count == wanted else f"{count} Hessian rows stored, {wanted} requested"


def _prepare_existing(path: Path, structures: Sequence[Atoms], hessian_rows: int = 0) -> int:
    """Cut off a torn last frame, check the stored frames are the requested prefix (with ``hessian_rows``
    Hessian rows each, up to 3n); return their count."""
    import ase.io

    frames, end, size = complete_frames(path)
    if end < size:
        log.warning("%s: discarding a partially written last frame (%d bytes).", path, size - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    if frames == 0:
        return 0
    if frames > len(structures):
        raise LabelFileMismatchError(
            f"{path} already holds {frames} labelled structures but only {len(structures)} were requested; "
            "delete it or choose another output path."
        )
    stored = ase.io.read(path, index=":", format="extxyz")
    for index, (old, new) in enumerate(zip(stored, structures)):
        reason = _same_structure(old, new) or _same_hessian_rows(old, min(hessian_rows, 3 * len(new)))
        if reason is not None:
            raise LabelFileMismatchError(
                f"{path} holds labels for other structures than requested (structure {index}: {reason}); "
                "delete it or choose another output path to label these structures."
            )
    return frames


def _label_one(atoms: Atoms, calculator: Any, index: int, hessian: dict[str, Any] | None = None) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    from .hessian import label_hessian_rows

    work = atoms.copy()  # keeps info (provenance) and arrays
    for key in (*_RESULT_KEYS, keys.HESSIAN_ROW_INDEX_INFO, keys.HESSIAN_ROWS_ARRAY):  # stale labels would clash
        work.info.pop(key, None)
        if key in work.arrays:
            del work.arrays[key]
    work.calc = calculator
    energy = float(work.get_potential_energy())
    forces = np.array(work.get_forces(), dtype=np.float64)
    if not math.isfinite(energy) or not np.isfinite(forces).all():
        where = "energy" if not math.isfinite(energy) else "forces"
        tag = f" (config_type={atoms.info['config_type']!r})" if "config_type" in atoms.info else ""
        raise NonFiniteLabelError(
            f"The teacher returned a non-finite {where} for structure {index}{tag}: energy={energy}, "
            f"{int((~np.isfinite(forces)).sum())} non-finite force components."
        )
    results: dict[str, Any] = {"energy": energy, "forces": forces}
    if work.pbc.all() and "stress" in getattr(calculator, "implemented_properties", ()):
        stress = np.array(work.get_stress(voigt=True), dtype=np.float64)
        if not np.isfinite(stress).all():
            raise NonFiniteLabelError(f"The teacher returned a non-finite stress for structure {index}: {stress}.")
        results["stress"] = stress
    work.calc = SinglePointCalculator(work, **results)
    if hessian is not None and hessian["rows"] > 0:
        label_hessian_rows(work, calculator, hessian["rows"], hessian["seed"], index, hessian["delta"])
        if not np.isfinite(work.arrays[keys.HESSIAN_ROWS_ARRAY]).all():
            raise NonFiniteLabelError(f"The teacher's Hessian rows of structure {index} are not finite.")
    return work


def _append(path: Path, frames: list[Atoms]) -> None:
    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, frames, format="extxyz")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def label_structures(
    structures: Sequence[Atoms],
    calculator: Any,
    output: str | os.PathLike[str],
    chunk_size: int = 50,
    progress: bool = True,
    hessian_rows: int = 0,
    hessian_delta: float = DEFAULT_DELTA,
    hessian_seed: int = 0,
) -> Path:
    """Compute energy and forces of every structure with ``calculator`` and write them to ``output``.

    ``output`` is an extended-XYZ file, appended chunk by chunk (each chunk fsynced); the input
    structures' ``info`` (e.g. ``config_type``) is kept. If ``output`` exists it must hold a prefix of
    ``structures`` (else :class:`LabelFileMismatchError`); only the rest is computed. A NaN/inf label
    raises :class:`NonFiniteLabelError` naming the structure's index, after saving those before it.
    With ``hessian_rows > 0`` each structure also gets that many rows of the teacher's energy Hessian
    (random, seeded by ``(hessian_seed, index)``; central differences with ``hessian_delta`` Å, 2 more
    calls per row, unless the calculator has ``hessian_rows()``; see :mod:`.hessian`).
    Returns the output path.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if hessian_rows < 0:
        raise ValueError(f"hessian_rows must be >= 0, got {hessian_rows}.")
    hessian = {"rows": int(hessian_rows), "delta": float(hessian_delta), "seed": int(hessian_seed)}
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _prepare_existing(path, structures, hessian_rows) if path.exists() else 0
    total = len(structures)
    if done == total:
        log.info("%s already holds all %d labelled structures.", path, total)
        if not path.exists():
            path.touch()
        return path
    if done:
        log.info("Resuming %s: %d of %d structures already labelled.", path, done, total)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"Labelling -> {path.name}", total=total, completed=done)
        for start in range(done, total, chunk_size):
            labelled: list[Atoms] = []
            try:
                for index in range(start, min(start + chunk_size, total)):
                    labelled.append(_label_one(structures[index], calculator, index, hessian))
                    bar.advance(task)
            finally:  # keep what this chunk finished, even when the teacher fails or we are interrupted
                if labelled:
                    _append(path, labelled)
    log.info("Labelled %d structures (%d computed now) -> %s", total, total - done, path)
    return path


def read_labelled(path: str | os.PathLike[str], index: str | int = ":") -> Any:
    """Read structures written by :func:`label_structures` (labels via ``get_potential_energy``/``get_forces``)."""
    import ase.io

    return ase.io.read(path, index=index, format="extxyz")
