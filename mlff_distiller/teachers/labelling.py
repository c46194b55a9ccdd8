"""Label structures with a teacher, chunk by chunk, into a resumable extended-XYZ file.

Every chunk is appended, flushed and fsynced before the next one starts, so an interrupted job keeps what
it finished. Rerunning with the same structures and output computes only the rest: the frames already in
the file must be the requested structures' prefix (same elements, cell, pbc and positions), and a frame
torn by a kill mid-write is cut off first. Labels are stored the way ASE reads them back as a
``SinglePointCalculator``: ``ase.io.read(path, ":")[i].get_potential_energy()`` / ``.get_forces()``.
Optional Hessian rows (for distillation) and the teacher's site energies are computed with a
structure's other labels and stored with it (:mod:`.hessian`), so they are cached and resumed alike.

What each structure cost the teacher (calls, CPU seconds) goes to a ledger beside the file
(:func:`cost_path`, :func:`labelling_cost`); timings stay out of the labelled file, which is therefore the
same, byte for byte, however it was produced with a deterministic teacher: in one process, in worker
processes (finished chunks wait as part files and are appended in order), or as contiguous shards
labelled by separate jobs and merged (:func:`merge_shards`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import keys
from .calculators import CalculatorSpec, check_site_energies, enable_site_energies, require_teacher
from .hessian import DEFAULT_DELTA, check_hessian_method, check_hessian_method_for, hessian_rows_function

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

POSITION_TOLERANCE = 1e-6
"""Å; stored frames keep 8 decimals, so a resumed prefix must match the requested positions to this."""

_RESULT_KEYS = ("energy", "free_energy", "forces", "stress", "energies", "stresses", "magmom", "magmoms")
_LABEL_INFO = (keys.HESSIAN_ROW_INDEX_INFO, keys.HESSIAN_METHOD_INFO, keys.TEACHER_CALLS_INFO)


class NonFiniteLabelError(ValueError):
    """The teacher returned a NaN or infinite energy or force."""


class LabelFileMismatchError(ValueError):
    """An existing output file does not hold a prefix of the requested structures."""


def complete_frames(path: str | os.PathLike[str], limit: int | None = None) -> tuple[int, int, int]:
    """Scan an extended-XYZ file: (complete frames, byte offset where they end, file size).

    A frame is complete when its atom-count line, comment line and all its atom lines are present, each
    ending in a newline. Bytes after the last complete frame are a torn (partially written) frame. With
    ``limit``, the scan stops after that many frames. Raises ``ValueError`` if a full line where an atom
    count belongs is not an integer.
    """
    data = Path(path).read_bytes()
    frames = end = position = 0
    size = len(data)
    while position < size and (limit is None or frames < limit):
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


def _truncate(path: Path, end: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())


def keep_first_structures(path: str | os.PathLike[str], count: int) -> None:
    """Keep the first ``count`` structures of a labelled file and their cost entries, if it holds more (the
    kept bytes are unchanged); a file with ``count`` or fewer is left as it is."""
    path = Path(path)
    if not path.is_file():
        return
    frames, end, size = complete_frames(path, limit=count)
    if frames == count and end < size:
        _truncate(path, end)
        _prune_costs(path, 0, count)


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


@dataclass(frozen=True)
class LabelOptions:
    """What to compute for each structure besides energy, forces and stress (picklable: workers get it)."""

    hessian_rows: int = 0
    """Seeded-random rows of the energy Hessian per structure (up to 3n)."""
    hessian_delta: float = DEFAULT_DELTA
    """Å, the displacement of finite-difference rows."""
    hessian_seed: int = 0
    """With the structure's index, seeds the choice of rows."""
    hessian_method: str = "auto"
    """``fd``, ``autograd`` or ``auto`` (see :func:`~.hessian.hessian_rows_function`)."""
    site_energies: bool = False
    """Whether to store the teacher's per-atom energies (``atoms.arrays["site_energies"]``)."""

    def check(self) -> None:
        if self.hessian_rows < 0:
            raise ValueError(f"hessian_rows must be >= 0, got {self.hessian_rows}.")
        if self.hessian_rows > 0 and not self.hessian_delta > 0:
            raise ValueError(f"hessian_delta={self.hessian_delta} must be > 0 (Å).")
        check_hessian_method(self.hessian_method)


class _Teacher:
    """A calculator ready to label: site energies switched on, Hessian method resolved (both fail here,
    before any work, when the teacher cannot do what is asked), and its evaluations counted."""

    def __init__(self, calculator: Any, options: LabelOptions) -> None:
        if options.site_energies:
            enable_site_energies(calculator)
        self.calculator = calculator
        self.options = options
        self.hessian = (
            hessian_rows_function(calculator, options.hessian_method, options.hessian_delta)
            if options.hessian_rows > 0
            else None
        )
        self.calls = 0

    @property
    def hessian_kind(self) -> str | None:
        return self.hessian[0] if self.hessian is not None else None

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count ``calculate`` invocations (every ASE property request that was not cached goes through it)."""
        calculator = self.calculator
        shadowed = calculator.__dict__.get("calculate")
        method = calculator.calculate

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)

        calculator.calculate = counted
        try:
            yield
        finally:
            if shadowed is None:
                del calculator.calculate
            else:
                calculator.calculate = shadowed


def _expected_hessian_kind(calculator: Any, options: LabelOptions) -> str | None:
    """How rows will be computed (checked against stored frames on resume), known before building a spec's
    calculator for built-in teachers; None when unknown or no rows are asked for."""
    if options.hessian_rows == 0:
        return None
    if isinstance(calculator, _Teacher):
        return calculator.hessian_kind
    teacher = calculator.teacher if isinstance(calculator, CalculatorSpec) else None
    if teacher is None:
        return None
    return "autograd" if options.hessian_method != "fd" and teacher.autograd_hessian else "fd"


def _same_labels(stored: Atoms, options: LabelOptions, hessian_kind: str | None) -> str | None:
    """Why ``stored`` does not carry the labels ``options`` ask for (None if it does)."""
    wanted = min(options.hessian_rows, 3 * len(stored))
    has_rows = keys.HESSIAN_ROWS_ARRAY in stored.arrays and keys.HESSIAN_ROW_INDEX_INFO in stored.info
    count = len(np.atleast_1d(stored.info[keys.HESSIAN_ROW_INDEX_INFO])) if has_rows else 0
    if count != wanted:
        return f"{count} Hessian rows stored, {wanted} requested"
    if count and hessian_kind is not None:
        # Files written before the method was recorded hold finite-difference rows.
        kind = stored.info.get(keys.HESSIAN_METHOD_INFO, "fd")
        if kind != hessian_kind:
            return f"Hessian rows stored by {kind!r}, {hessian_kind!r} requested"
    has_sites = keys.SITE_ENERGIES_ARRAY in stored.arrays
    if has_sites != options.site_energies:
        stored_text, wanted_text = ("stored", "not requested") if has_sites else ("not stored", "requested")
        return f"site energies {stored_text}, {wanted_text}"
    return None


def _prepare_existing(
    path: Path, structures: Sequence[Atoms], options: LabelOptions, hessian_kind: str | None = None
) -> int:
    """Cut off a torn last frame, check the stored frames are the requested prefix with the requested
    labels; return their count."""
    import ase.io

    frames, end, size = complete_frames(path)
    if end < size:
        log.warning("%s: discarding a partially written last frame (%d bytes).", path, size - end)
        _truncate(path, end)
    if frames == 0:
        return 0
    if frames > len(structures):
        raise LabelFileMismatchError(
            f"{path} already holds {frames} labelled structures but only {len(structures)} were requested; "
            "delete it or choose another output path."
        )
    stored = ase.io.read(path, index=":", format="extxyz")
    for index, (old, new) in enumerate(zip(stored, structures)):
        reason = _same_structure(old, new) or _same_labels(old, options, hessian_kind)
        if reason is not None:
            raise LabelFileMismatchError(
                f"{path} holds labels for other structures than requested (structure {index}: {reason}); "
                "delete it or choose another output path to label these structures."
            )
    return frames


def _label_one(atoms: Atoms, teacher: _Teacher, index: int) -> tuple[Atoms, dict[str, Any]]:
    """The labelled copy of structure ``index`` and what it cost (teacher calls, CPU and wall seconds)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from .hessian import label_hessian_rows

    options, calculator = teacher.options, teacher.calculator
    work = atoms.copy()  # keeps info (provenance) and arrays
    stale = (*_RESULT_KEYS, *_LABEL_INFO, keys.HESSIAN_ROWS_ARRAY, keys.SITE_ENERGIES_ARRAY)
    for key in stale:  # stale labels would clash
        work.info.pop(key, None)
        if key in work.arrays:
            del work.arrays[key]
    if hasattr(calculator, "reset"):
        calculator.reset()  # no results cached from the previous structure: same calls whatever ran before
    cpu, wall, calls = time.process_time(), time.perf_counter(), teacher.calls
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
    site_energies = None
    if options.site_energies:
        site_energies = np.array(work.get_potential_energies(), dtype=np.float64).reshape(-1)
        _check_site_energies(site_energies, energy, len(work), index)
    work.calc = SinglePointCalculator(work, **results)
    if site_energies is not None:
        work.arrays[keys.SITE_ENERGIES_ARRAY] = site_energies
    extra_calls = 0
    if teacher.hessian is not None:
        kind = label_hessian_rows(
            work, calculator, options.hessian_rows, options.hessian_seed, index, options.hessian_delta, teacher.hessian
        )
        extra_calls = 1 if kind == "autograd" else 0  # its forward pass; calculate() is not involved
        if not np.isfinite(work.arrays[keys.HESSIAN_ROWS_ARRAY]).all():
            raise NonFiniteLabelError(f"The teacher's Hessian rows of structure {index} are not finite.")
    spent = teacher.calls - calls + extra_calls
    work.info[keys.TEACHER_CALLS_INFO] = spent
    cost = {
        "index": index,
        "calls": spent,
        "cpu_s": round(time.process_time() - cpu, 6),
        "wall_s": round(time.perf_counter() - wall, 6),
    }
    return work, cost


def _check_site_energies(values: np.ndarray, energy: float, n: int, index: int) -> None:
    if values.shape != (n,) or not np.isfinite(values).all():
        raise NonFiniteLabelError(
            f"The teacher's site energies of structure {index} are not {n} finite numbers (shape {values.shape})."
        )
    if abs(float(values.sum()) - energy) > keys.SITE_ENERGY_SUM_TOLERANCE * max(n, 1):
        raise ValueError(
            f"The teacher's site energies of structure {index} sum to {values.sum():.6f} eV, not to its energy "
            f"{energy:.6f} eV; such labels cannot be matched by a student (whose site energies sum to its "
            "energy). Label without site energies (site_energies=false)."
        )


# ---------------------------------------------------------------------- files: frames and their cost
def cost_path(path: str | os.PathLike[str]) -> Path:
    """The cost ledger kept beside a labelled file: ``<file>.cost.jsonl``, one JSON line per structure
    (``index``, teacher ``calls``, ``cpu_s``, ``wall_s``). Timings vary from run to run, so they are kept
    out of the labelled file, which stays byte-identical for a deterministic teacher."""
    path = Path(path)
    return path.with_name(path.name + ".cost.jsonl")


def _write_all(path: Path, text: str, mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _frames_text(frames: list[Atoms]) -> str:
    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, frames, format="extxyz")
    return buffer.getvalue()


def _costs_text(costs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(cost, sort_keys=True) + "\n" for cost in costs)


def _commit(path: Path, frames_text: str, costs_text: str) -> None:
    """Append a chunk: its costs first, then its frames, so that every stored frame has its cost entry."""
    _write_all(cost_path(path), costs_text)
    _write_all(path, frames_text)


def _read_costs(path: Path) -> list[dict[str, Any]]:
    ledger = cost_path(path)
    if not ledger.exists():
        return []
    entries = []
    for line in ledger.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill
    return entries


def _prune_costs(path: Path, first: int, stop: int) -> None:
    """Keep the cost entries of structures ``first <= index < stop`` (those whose frames are stored)."""
    ledger = cost_path(path)
    if not ledger.exists():
        return
    kept: dict[int, dict[str, Any]] = {}
    for entry in _read_costs(path):
        if first <= int(entry.get("index", -1)) < stop:
            kept[int(entry["index"])] = entry
    temporary = ledger.with_name(ledger.name + ".tmp")
    _write_all(temporary, _costs_text([kept[i] for i in sorted(kept)]), mode="w")
    os.replace(temporary, ledger)


def labelling_cost(path: str | os.PathLike[str], per_structure: bool = False) -> dict[str, Any]:
    """What labelling the file ``path`` cost the teacher, from its ledger (:func:`cost_path`).

    Returns ``structures`` (frames in the file), ``teacher_calls`` (energy+forces evaluations: a single
    point is 1, a finite-difference Hessian row 2, an autograd pass 1), ``teacher_cpu_seconds`` (CPU time of
    the labelling process or worker, all its threads, spent on each structure), ``teacher_wall_seconds``
    (summed over structures: worker-seconds in parallel runs) and ``structures_without_cost`` (frames
    written by a version that kept no ledger). With ``per_structure``, also ``calls_per_structure`` and
    ``cpu_seconds_per_structure`` (None where unknown), in file order.
    """
    path = Path(path)
    frames = complete_frames(path)[0] if path.exists() else 0
    by_index = {int(entry["index"]): entry for entry in _read_costs(path)}
    order = sorted(by_index)[:frames]
    summary: dict[str, Any] = {
        "structures": frames,
        "teacher_calls": int(sum(by_index[i]["calls"] for i in order)),
        "teacher_cpu_seconds": round(sum(by_index[i]["cpu_s"] for i in order), 3),
        "teacher_wall_seconds": round(sum(by_index[i]["wall_s"] for i in order), 3),
        "structures_without_cost": frames - len(order),
    }
    if per_structure:
        summary["calls_per_structure"] = [by_index[i]["calls"] for i in order]
        summary["cpu_seconds_per_structure"] = [round(by_index[i]["cpu_s"], 4) for i in order]
    return summary


# ---------------------------------------------------------------------- labelling a range of structures
def _label_range_serial(
    structures: Sequence[Atoms], start: int, stop: int, teacher: _Teacher, path: Path, chunk_size: int, bar: Any
) -> None:
    """Label structures ``start <= index < stop`` (appended to ``path``, which holds those before ``start``)."""
    with teacher.counting():
        for first in range(start, stop, chunk_size):
            labelled: list[Atoms] = []
            costs: list[dict[str, Any]] = []
            try:
                for index in range(first, min(first + chunk_size, stop)):
                    frame, cost = _label_one(structures[index], teacher, index)
                    labelled.append(frame)
                    costs.append(cost)
                    bar.advance(1)
            finally:  # keep what this chunk finished, even when the teacher fails or we are interrupted
                if labelled:
                    _commit(path, _frames_text(labelled), _costs_text(costs))


def _chunks(start: int, stop: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) cut at the multiples of ``chunk_size``, so that a resumed run cuts the same chunks."""
    bounds = [start, *range((start // chunk_size + 1) * chunk_size, stop, chunk_size), stop]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def parts_directory(path: str | os.PathLike[str]) -> Path:
    """Where parallel labelling keeps finished chunks not yet appended to ``path``: ``<file>.parts/``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _part_files(directory: Path, first: int, stop: int) -> tuple[Path, Path]:
    stem = f"{first:09d}-{stop:09d}"
    return directory / f"{stem}.extxyz", directory / f"{stem}.cost.json"


_WORKER: dict[str, Any] = {}
"""In a worker process: its calculator source and options (set by the initializer), and its teacher."""


def _worker_init(source: CalculatorSpec, options: LabelOptions) -> None:
    _WORKER.update(source=source, options=options, teacher=None)


def _worker_label(task: tuple[int, int, list[Atoms], str]) -> tuple[int, int]:
    """Label one chunk in a worker into its part files (costs, then frames, each renamed into place)."""
    first, stop, chunk, directory = task
    teacher = _WORKER["teacher"]
    if teacher is None:  # built here, not in the initializer: a failure then reaches the parent as an error
        teacher = _WORKER["teacher"] = _Teacher(_WORKER["source"].build(), _WORKER["options"])
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    frames, costs = [], []
    with teacher.counting():
        for offset, atoms in enumerate(chunk):
            frame, cost = _label_one(atoms, teacher, first + offset)
            frames.append(frame)
            costs.append(cost)
    frames_file, costs_file = _part_files(Path(directory), first, stop)
    for target, text in ((costs_file, json.dumps(costs)), (frames_file, _frames_text(frames))):
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        _write_all(temporary, text, mode="w")
        os.replace(temporary, target)
    return first, stop


def _finished_part(
    directory: Path, first: int, stop: int, structures: Sequence[Atoms], options: LabelOptions, kind: str | None
) -> bool:
    """Whether a previous run left the complete, matching part of chunk [first, stop)."""
    frames_file, costs_file = _part_files(directory, first, stop)
    if not (frames_file.exists() and costs_file.exists()):
        return False
    try:
        return _prepare_existing(frames_file, structures[first:stop], options, kind) == stop - first
    except (LabelFileMismatchError, ValueError):
        return False


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Processes started inside see one-thread settings for OpenMP/BLAS (read when numpy or torch load)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _label_range_parallel(
    structures: Sequence[Atoms],
    start: int,
    stop: int,
    spec: CalculatorSpec,
    options: LabelOptions,
    kind: str | None,
    path: Path,
    chunk_size: int,
    workers: int,
    bar: Any,
) -> None:
    """Label structures ``start <= index < stop`` in ``workers`` spawned processes, one chunk per task;
    finished chunks wait as part files and are appended to ``path`` in order."""
    import multiprocessing

    directory = parts_directory(path)
    directory.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(start, stop, chunk_size)
    ready = {chunk for chunk in chunks if _finished_part(directory, *chunk, structures, options, kind)}
    keep = {name for chunk in ready for name in (p.name for p in _part_files(directory, *chunk))}
    for stale in directory.iterdir():  # other chunkings, torn temporaries, parts of other structures
        if stale.name not in keep:
            stale.unlink()
    if ready:
        log.info("%s: reusing %d finished chunks of a previous run.", path, len(ready))
    tasks = [(a, b, list(structures[a:b]), str(directory)) for a, b in chunks if (a, b) not in ready]
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        results: Iterator[tuple[int, int]] = iter(())
        if tasks:
            with single_threaded_children():
                pool = stack.enter_context(
                    context.Pool(min(workers, len(tasks)), initializer=_worker_init, initargs=(spec, options))
                )
            results = pool.imap(_worker_label, tasks)
        for chunk in chunks:
            if chunk not in ready:
                if next(results) != chunk:
                    raise RuntimeError(f"parallel labelling returned chunks out of order at {chunk}")
            frames_file, costs_file = _part_files(directory, *chunk)
            costs = json.loads(costs_file.read_text(encoding="utf-8"))
            _commit(path, frames_file.read_text(encoding="utf-8"), _costs_text(costs))
            frames_file.unlink()
            costs_file.unlink()
            bar.advance(chunk[1] - chunk[0])
    with contextlib.suppress(OSError):
        directory.rmdir()


def _label_range(
    structures: Sequence[Atoms],
    start: int,
    stop: int,
    calculator: Any,
    options: LabelOptions,
    path: Path,
    chunk_size: int,
    workers: int,
    progress: bool,
) -> Path:
    """Label structures ``start <= index < stop`` into ``path`` (resumable): the serial or parallel path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = _expected_hessian_kind(calculator, options)
    done = _prepare_existing(path, structures[start:stop], options, kind) if path.exists() else 0
    _prune_costs(path, start, start + done)
    total = stop - start
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
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as progress_bar:
        task = progress_bar.add_task(f"Labelling -> {path.name}", total=total, completed=done)
        bar = _Advance(progress_bar, task)
        if workers > 1:
            _label_range_parallel(
                structures, start + done, stop, calculator, options, kind, path, chunk_size, workers, bar
            )
        else:
            teacher = calculator if isinstance(calculator, _Teacher) else _Teacher(calculator.build(), options)
            _label_range_serial(structures, start + done, stop, teacher, path, chunk_size, bar)
    log.info("Labelled %d structures (%d computed now) -> %s", total, total - done, path)
    return path


@dataclass
class _Advance:
    progress: Any
    task: Any

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)


# ---------------------------------------------------------------------- shards (cluster jobs, torchrun)
def shard_bounds(total: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of ``total`` structures for ``num_shards`` shards; sizes differ by
    at most one, earlier shards take the extra structures."""
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1.")
    size, extra = divmod(total, num_shards)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(num_shards)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_path(output: str | os.PathLike[str], shard_index: int, num_shards: int) -> Path:
    """The file shard ``shard_index`` of ``num_shards`` is labelled into: ``<stem>.shard-I-of-N<suffix>``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.shard-{shard_index:04d}-of-{num_shards:04d}{output.suffix}")


class IncompleteShardsError(RuntimeError):
    """A merge was asked for while some shards are missing or unfinished."""


def _shard_progress(structures: Sequence[Atoms], output: Path, num_shards: int, options: LabelOptions) -> list[int]:
    """Complete frames of each shard file (0 for a missing one)."""
    done = []
    for index, (start, stop) in enumerate(shard_bounds(len(structures), num_shards)):
        path = shard_path(output, index, num_shards)
        done.append(_prepare_existing(path, structures[start:stop], options) if path.exists() else 0)
    return done


def merge_shards(
    structures: Sequence[Atoms],
    output: str | os.PathLike[str],
    num_shards: int,
    hessian_rows: int = 0,
    hessian_delta: float = DEFAULT_DELTA,
    hessian_seed: int = 0,
    hessian_method: str = "auto",
    site_energies: bool = False,
    require_complete: bool = True,
) -> bool:
    """Concatenate the ``num_shards`` shard files of ``output`` (:func:`shard_path`) into ``output`` and
    its cost ledger, once every shard holds all its structures with the requested labels; then remove them.

    ``output`` appears only complete (written to a temporary file and renamed). A complete ``output`` is
    left as it is. With shards missing or unfinished: :class:`IncompleteShardsError` naming each, or
    ``False`` when ``require_complete`` is false (the last shard job to finish merges; the others return).
    Returns True when ``output`` is complete. Label options must be those the shards were labelled with.
    """
    options = LabelOptions(hessian_rows, hessian_delta, hessian_seed, hessian_method, site_energies)
    options.check()
    output = Path(output)
    total = len(structures)
    if output.exists():
        present = _prepare_existing(output, structures, options)
        if present == total:
            return True
        raise LabelFileMismatchError(
            f"{output} holds {present} of {total} labelled structures from another (unsharded) run; delete it "
            "or choose another output path before merging shards into it."
        )
    bounds = shard_bounds(total, num_shards)
    try:
        done = _shard_progress(structures, output, num_shards, options)
    except FileNotFoundError:  # a shard vanished while being read: another job is merging
        done = [0] * num_shards
    unfinished = [
        f"shard {i} ({shard_path(output, i, num_shards).name}): {d} of {b - a} labelled"
        for i, ((a, b), d) in enumerate(zip(bounds, done))
        if d < b - a
    ]
    if unfinished:
        if _merged_meanwhile(output, total):
            return True
        if not require_complete:
            return False
        raise IncompleteShardsError(
            f"Cannot merge {output}: {len(unfinished)} of {num_shards} shards are unfinished: "
            f"{'; '.join(unfinished)}. Run the missing shard jobs (shard_index=...) again; they resume."
        )
    temporary = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    ledger_temporary = cost_path(temporary)
    try:
        for mode, index in zip(["w"] + ["a"] * (num_shards - 1), range(num_shards)):
            path = shard_path(output, index, num_shards)
            _write_all(ledger_temporary, _costs_text(_read_costs(path)), mode=mode)
            _write_all(temporary, path.read_text(encoding="utf-8"), mode=mode)
    except FileNotFoundError:  # another job merged and removed the shards meanwhile
        temporary.unlink(missing_ok=True)
        ledger_temporary.unlink(missing_ok=True)
        if _merged_meanwhile(output, total):
            return True
        raise
    os.replace(ledger_temporary, cost_path(output))
    os.replace(temporary, output)
    for index in range(num_shards):
        path = shard_path(output, index, num_shards)
        path.unlink(missing_ok=True)
        cost_path(path).unlink(missing_ok=True)
    log.info("Merged %d shards into %s (%d structures).", num_shards, output, total)
    return True


def _merged_meanwhile(output: Path, total: int) -> bool:
    """Whether another job (shard jobs finishing together) has written the complete merged file."""
    return output.exists() and complete_frames(output)[0] == total


# ---------------------------------------------------------------------- the entry point
def label_structures(
    structures: Sequence[Atoms],
    calculator: Any,
    output: str | os.PathLike[str],
    chunk_size: int = 50,
    progress: bool = True,
    hessian_rows: int = 0,
    hessian_delta: float = DEFAULT_DELTA,
    hessian_seed: int = 0,
    hessian_method: str = "auto",
    site_energies: bool = False,
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int | None = None,
) -> Path:
    """Compute energy and forces (and stress, for periodic cells) of every structure with the teacher
    ``calculator`` and write them to ``output``; returns the file written.

    ``calculator`` is an ASE calculator, or a :class:`~.calculators.CalculatorSpec` (teacher name and
    constructor arguments), which ``workers > 1`` needs. ``output`` is an extended-XYZ file, appended
    chunk by chunk (each chunk fsynced); the input structures' ``info`` (e.g. ``config_type``) is kept,
    and ``info["teacher_calls"]`` records the teacher evaluations each structure took. If ``output``
    exists it must hold a prefix of ``structures`` with the same labels (else
    :class:`LabelFileMismatchError`); only the rest is computed. A NaN/inf label raises
    :class:`NonFiniteLabelError` naming the structure's index, after saving the chunks before it. The
    teacher's cost per structure (calls, CPU seconds) goes to the ledger :func:`cost_path` beside
    ``output``; :func:`labelling_cost` sums it.

    - ``hessian_rows > 0``: that many rows of the teacher's energy Hessian per structure (random, seeded
      by ``(hessian_seed, index)``), by ``hessian_method`` (``fd``: central differences with
      ``hessian_delta`` Å, 2 calls per row; ``autograd``: double backward for CHGNet and SevenNet, or the
      calculator's own ``hessian_rows()``; ``auto``: autograd where available); see :mod:`.hessian`.
    - ``site_energies``: the teacher's per-atom energies too (``atoms.arrays["site_energies"]``); a
      teacher without them raises :class:`~.calculators.SiteEnergiesUnavailableError` before any work.
    - ``workers > 1``: that many spawned processes (one thread each), each building its own teacher from
      the spec, label one chunk of ``chunk_size`` structures per task; finished chunks wait in
      :func:`parts_directory` and are appended in order, so the file is the one a serial run writes (byte
      for byte with a deterministic teacher), and a killed run resumes from the file and the parts.
      Call it under ``if __name__ == "__main__":`` in a script (processes are spawned).
    - ``shard_index`` (with ``num_shards``): label only that contiguous shard into
      :func:`shard_path`, resumable alike (one cluster job or torchrun process per shard); the job that
      completes the last shard merges them into ``output`` (:func:`merge_shards`). ``num_shards > 1``
      without ``shard_index`` only merges, and fails naming the unfinished shards.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1 (worker processes labelling in parallel).")
    if num_shards < 1 or (shard_index is not None and not 0 <= shard_index < num_shards):
        raise ValueError(
            f"shard_index={shard_index} and num_shards={num_shards}: need num_shards >= 1 and "
            "0 <= shard_index < num_shards (or shard_index None)."
        )
    options = LabelOptions(hessian_rows, hessian_delta, hessian_seed, hessian_method, site_energies)
    options.check()
    output = Path(output)
    label_options = dict(
        hessian_rows=hessian_rows,
        hessian_delta=hessian_delta,
        hessian_seed=hessian_seed,
        hessian_method=hessian_method,
        site_energies=site_energies,
    )
    if num_shards > 1 and shard_index is None:
        merge_shards(structures, output, num_shards, **label_options)
        return output
    source = _prepare_source(calculator, options, workers)
    if shard_index is None:
        return _label_range(structures, 0, len(structures), source, options, output, chunk_size, workers, progress)
    start, stop = shard_bounds(len(structures), num_shards)[shard_index]
    path = shard_path(output, shard_index, num_shards)
    _label_range(structures, start, stop, source, options, path, chunk_size, workers, progress)
    if merge_shards(structures, output, num_shards, require_complete=False, **label_options):
        return output
    return path


def _prepare_source(calculator: Any, options: LabelOptions, workers: int) -> Any:
    """The teacher as ``_label_range`` takes it, after checking (before any work) that it can do what
    ``options`` ask: a ready :class:`_Teacher` for an ASE calculator, the spec for worker processes."""
    if isinstance(calculator, CalculatorSpec):
        teacher = calculator.teacher
        if options.site_energies:
            check_site_energies(calculator)
        if options.hessian_rows > 0:
            check_hessian_method_for(teacher, options.hessian_method)
        if teacher is not None:
            require_teacher(teacher.name)
        return calculator if workers > 1 else _Teacher(calculator.build(), options)
    if workers > 1:
        raise TypeError(
            f"workers={workers} needs the teacher as a CalculatorSpec (name and constructor arguments, e.g. "
            "CalculatorSpec('chgnet', {})), so that each worker process builds its own; got a "
            f"{type(calculator).__name__} object, which cannot be shared between processes."
        )
    return _Teacher(calculator, options)


def read_labelled(path: str | os.PathLike[str], index: str | int = ":") -> Any:
    """Read structures written by :func:`label_structures` (labels via ``get_potential_energy``/``get_forces``)."""
    import ase.io

    return ase.io.read(path, index=index, format="extxyz")
