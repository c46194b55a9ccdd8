"""The active (concurrent-learning) loop: let the students find the structures the teacher should label.

Round 0 is the sampler's labelled set (:class:`~mlff_distiller.teachers.sampling.SamplingConfig`). Each later
round r

1. trains a committee of students on everything labelled so far (member k warm-starts from member k of
   round r-1; members differ by seed: initialisation, validation split and data order);
2. explores: Langevin MD driven by member 0 from structures of the training set, at the target temperatures
   and hotter (``hot_factor`` x the highest, where the stability gate runs), in the plain cell, a strained
   cell and a cell of at least ``large_atoms`` atoms; frames every ``frame_interval`` steps are candidates,
   and a run that becomes unphysical is stopped, its last sane frames marked;
3. reserves ``fresh_per_round`` frames at the target temperatures as a fresh-frame test, labels them
   (a separate budget) and measures member 0 on them: stop when the force MAE is within
   ``target_force_ratio`` of the teacher's force spread on those frames;
4. scores the other candidates by the committee's disagreement (max per-atom force deviation, eV/Å,
   :mod:`.committee`), keeps those inside the trust window [``trust_low``, ``trust_high``] x the teacher's
   force std (below: already learned; above: unphysical) plus the marked frames of unstable runs, the most
   uncertain first, at most ``max_per_run`` per exploration run, no near-duplicates of the training set,
   at most ``per_round`` and never beyond ``teacher_budget``; ``selection: random`` draws uniformly instead;
5. labels them with the teacher through :func:`~mlff_distiller.teachers.labelling.label_structures`.

Why the trust window is relative, and why [0.1, 1.0]: DP-GEN trusts 0.05-0.15 eV/Å for DFT-accurate models
of systems whose forces spread by about 1 eV/Å, i.e. a window set by the force scale. Our students are
small (their force MAE is a few % of the spread), and the score is a maximum over 32-108 atoms of a per-atom
vector deviation, several times the mean component error; below a tenth of the spread the committee agrees
as well as its members can learn. A worst atom that disagrees by as much as the forces themselves spread
marks a structure far from anything learned (atoms overlapping, an MD run gone wrong): labelling it teaches
the student about unphysical regions, so it is skipped, unless it is one of the last sane frames of an
exploration run that became unphysical (those are the student's actual failure and are always candidates).
For a liquid the upper edge can be the student's failure too: a SevenNet water student's 0.5-ps runs
wandered, with no atoms too close, into frames where the teacher's forces spread 2.5x wider than in round 1;
216 of 576 candidates scored above the window. ``astray_frames`` keeps the first frames of each run beyond
the window (where the run left what the students had learned) as candidates whatever their score.

It stops on the fresh-frame target, the teacher-call budget or the round limit. Everything lives in a state
directory keyed by every setting that changes the result (round 0, this config without ``rounds``, the
student recipe), one sub-directory per round: committee checkpoints (the Trainer resumes them mid-epoch),
scored candidates, selected and fresh frames, labels (resumable) and a ``summary.json`` written last. A
finished round is never recomputed; a run killed anywhere continues where it stopped when the same command
runs again. The budget is part of the key, but a run with another budget adopts what a sibling state (the same
key but for the budget) already computed for a round with the same training set: the committee, its candidates,
the fresh frames and as many of its labels as this budget selects (a selection is a prefix of the same greedy
order), so raising the budget continues the loop and lowering it costs no teacher call. Every structure keeps
its provenance in ``atoms.info``: ``round``, ``driver``, ``temperature_K``, ``variant``, ``score`` and
``provenance``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.keys import is_train_only
from ..teachers.cache import announce, cache_key, canonical, default_cache_dir, exclusive_lock, write_text_atomic
from ..teachers.cache import write_structures_atomic as write_structures
from ..teachers.structures import default_timestep_fs, fresh_copy, random_strain, supercell
from ..training.callbacks import Callback
from ..training.config import check_known_fields
from .budget import total_teacher_calls
from .gate import sampled_bounds
from .refine import label_like_round0

if TYPE_CHECKING:
    from ase import Atoms
    from torch import nn

    from ..data.statistics import DatasetStatistics
    from ..teachers.sampling import SamplingConfig
    from ..training import TrainingConfig

log = logging.getLogger(__name__)

LOOP_VERSION = 1
"""Bump when the loop's recipe changes so that cached states are not reused."""
SELECTIONS = ("committee", "random")
VARIANTS = ("plain", "strained", "large")


@dataclass
class ExploreConfig:
    """How each round's students explore (``distill.explore``)."""

    temperatures: list[float] | None = None
    """K; the target temperatures; null: those of round-0 sampling (``data.source.temperatures``)."""
    hot_factor: float = 1.5
    """Also explore at this x the highest target temperature (where the stability gate runs); 0: not."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Cells to explore in: ``plain`` (a training structure), ``strained`` (randomly strained up to
    ``strain_max``), ``large`` (a supercell of at least ``large_atoms`` atoms); periodic systems only for the
    last two."""
    large_atoms: int = 108
    """Atoms of the ``large`` cells (the stability gate runs at least 108)."""
    strain_max: float = 0.04
    """Largest component of the random symmetric strain of ``strained`` cells."""
    runs: int | None = None
    """MD runs per round, cycling through (variant, temperature); null: one per pair."""
    steps: int | list[int] = 150
    """MD steps per run; a list gives round r's length as its (r-1)-th entry, the last one repeated: explore
    longer as the students improve (DP-GEN's schedule), since a student that survives 0.1 ps can still fail
    in the stability gate's 20 ps."""
    equilibration_steps: int = 30
    """Steps before the first candidate frame."""
    frame_interval: int = 10
    """Steps between candidate frames."""
    timestep_fs: float | None = None
    """fs; null: 0.5 fs with hydrogen, else 2 fs."""
    friction_per_fs: float = 0.02
    """Langevin friction, 1/fs."""
    unstable_frames: int = 2
    """The last sane frames of a run that became unphysical, kept as candidates whatever their score."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(
                f"distill.explore.variants={self.variants!r} is invalid: give one or more of {', '.join(VARIANTS)}."
            )
        if self.temperatures is not None:
            self.temperatures = [float(t) for t in self.temperatures]
            if not self.temperatures or any(not math.isfinite(t) or t <= 0 for t in self.temperatures):
                raise ValueError(f"distill.explore.temperatures={self.temperatures!r}: give temperatures > 0 K.")
        if not isinstance(self.steps, int):  # a list (or an OmegaConf ListConfig) of per-round lengths
            self.steps = [int(s) for s in self.steps]
            if not self.steps:
                raise ValueError("distill.explore.steps=[] is invalid: give MD steps per run, or one per round.")
        for name in ("frame_interval", "large_atoms"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill.explore.{name}={getattr(self, name)!r} is invalid: it must be >= 1.")
        shortest = min(self.steps) if isinstance(self.steps, list) else self.steps
        if shortest < 1:
            raise ValueError(f"distill.explore.steps={self.steps!r} is invalid: every length must be >= 1.")
        if not 0 <= self.equilibration_steps < shortest:
            raise ValueError(
                f"distill.explore.equilibration_steps={self.equilibration_steps} must be in [0, steps) for every "
                f"round's steps ({self.steps!r})."
            )
        if self.hot_factor < 0 or not 0 <= self.strain_max < 0.5 or self.unstable_frames < 0:
            raise ValueError(
                f"distill.explore: hot_factor={self.hot_factor} must be >= 0, strain_max={self.strain_max} in "
                f"[0, 0.5) and unstable_frames={self.unstable_frames} >= 0."
            )
        if self.runs is not None and self.runs < 1:
            raise ValueError(f"distill.explore.runs={self.runs} is invalid: it must be >= 1 or null.")

    def steps_in(self, r: int) -> int:
        """MD steps of each exploration run of round ``r`` (>= 1)."""
        if isinstance(self.steps, list):
            return self.steps[min(r, len(self.steps)) - 1]
        return self.steps


@dataclass
class ActiveLoopConfig:
    """The active loop (``distill`` in the recipes); see the module docstring for what each part does."""

    rounds: int = 3
    """Exploration rounds after round 0; 0 is the one-shot recipe (round 0 only)."""
    committee: int = 2
    """Students per round (>= 2 for ``selection: committee``; ``random`` trains one)."""
    selection: str = "committee"
    """``committee`` (disagreement inside the trust window) or ``random`` (uniform among candidates)."""
    teacher_budget: int | None = None
    """Teacher calls for training labels, round 0 included (one energy + forces call = 1, a finite-difference
    Hessian row 2 more); never exceeded. null: no budget. The fresh-frame labels are counted apart."""
    per_round: int = 40
    """Structures labelled per round, at most."""
    max_per_run: int = 4
    """Structures selected from one exploration run, at most (its frames are correlated)."""
    trust_low: float = 0.1
    """Lower edge of the trust window, x the teacher's force std on round 0: below it the committee agrees."""
    trust_high: float = 1.0
    """Upper edge of the trust window, x the teacher's force std: above it the structure is taken as unphysical."""
    astray_frames: int = 0
    """Of each exploration run that scored above the trust window, its first this many frames there are
    candidates whatever their score: where the student's MD left what it had learned (0: none)."""
    target_force_ratio: float = 0.02
    """Stop when member 0's force MAE on the round's fresh frames is at most this x the teacher's force std there."""
    fresh_per_round: int = 8
    """Exploration frames at the target temperatures reserved, labelled and never trained on, per round."""
    epochs: int = 20
    """Training epochs of the first round's committee (from scratch)."""
    warm_epochs: int = 8
    """Training epochs of later committees (warm-started from the previous round's)."""
    dedup_tolerance: float = 0.01
    """Å / degrees; a candidate this close to a training structure (fingerprints) is a duplicate."""
    min_distance_fraction: float = 0.6
    """Exploration frames whose closest atoms are nearer than this x the smallest distance in round 0, or two
    atoms of an element pair nearer than this x that pair's closest contact in round 0, are unphysical (the run
    stops there, and no such frame is a candidate)."""
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    """How the students explore."""
    seed: int = 0
    """Seeds the committee, exploration and selection."""
    state_dir: str | None = None
    """Where rounds are kept; null: ``<data.source.cache_dir>/active_<system>_<teacher>_<hash12>`` (keyed)."""
    progress: bool = True
    """Messages on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.explore, Mapping):
            self.explore = ExploreConfig(**dict(self.explore))
        if self.selection not in SELECTIONS:
            raise ValueError(f"distill.selection={self.selection!r} is invalid; accepted: {', '.join(SELECTIONS)}.")
        if self.rounds < 0 or self.per_round < 1 or self.max_per_run < 1 or self.fresh_per_round < 0:
            raise ValueError(
                f"distill: rounds={self.rounds} must be >= 0, per_round={self.per_round} and "
                f"max_per_run={self.max_per_run} >= 1, fresh_per_round={self.fresh_per_round} >= 0."
            )
        if self.selection == "committee" and self.committee < 2:
            raise ValueError(
                f"distill.committee={self.committee} is invalid with selection=committee: a committee needs at least "
                "two students (or use distill.selection=random)."
            )
        if not 0 <= self.trust_low < self.trust_high:
            raise ValueError(
                f"distill.trust_low={self.trust_low} and distill.trust_high={self.trust_high} must satisfy "
                "0 <= trust_low < trust_high (fractions of the teacher's force std)."
            )
        if self.astray_frames < 0:
            raise ValueError(f"distill.astray_frames={self.astray_frames} is invalid: it must be >= 0.")
        if self.teacher_budget is not None and self.teacher_budget < 1:
            raise ValueError(f"distill.teacher_budget={self.teacher_budget} is invalid: give calls >= 1 or null.")
        if self.epochs < 1 or self.warm_epochs < 1:
            raise ValueError(f"distill.epochs={self.epochs} and distill.warm_epochs={self.warm_epochs} must be >= 1.")
        if not 0 < self.min_distance_fraction < 1 or self.target_force_ratio < 0 or self.dedup_tolerance < 0:
            raise ValueError(
                f"distill: min_distance_fraction={self.min_distance_fraction} must be in (0, 1), "
                f"target_force_ratio={self.target_force_ratio} and dedup_tolerance={self.dedup_tolerance} >= 0."
            )

    @property
    def members(self) -> int:
        return self.committee if self.selection == "committee" else 1

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ActiveLoopConfig:
        """Build from a mapping (e.g. the recipe's ``distill`` node), naming unknown keys and the accepted ones."""
        check_known_fields(cls, options, "distill option")
        check_known_fields(ExploreConfig, options.get("explore") or {}, "distill.explore option")
        return cls(**dict(options))

    def key_config(self) -> dict[str, Any]:
        """The settings that change what the rounds compute (the round limit, paths and messages do not)."""
        options = dataclasses.asdict(self)
        for name in ("rounds", "state_dir", "progress"):
            options.pop(name)
        if not options["astray_frames"]:  # off: the key of the states cached before the option existed
            options.pop("astray_frames")
        return options


@dataclass
class StudentRecipe:
    """How the loop builds and trains one student; the caller (``mlff-train``) fills it from its config."""

    build_model: Callable[[DatasetStatistics], nn.Module]
    """Statistics of the training set -> a fresh student."""
    build_loss: Callable[[], Any]
    """-> a fresh loss (``f(model, batch)``)."""
    training: TrainingConfig
    """Trainer settings; the loop sets ``checkpoint_dir``, ``max_epochs`` and ``seed`` per member."""
    data_options: dict[str, Any]
    """Keyword arguments of :class:`~mlff_distiller.data.module.AtomsDataModule` (``cutoff``, ``num_val``,
    ``batch_size``, ``group_key``, ...), without ``path``, ``source``, ``seed`` and ``num_test``."""
    fingerprint: dict[str, Any]
    """JSON-able description of everything above that changes the result (model, loss, optimizer, ...)."""
    optimizer: Any = None
    """An optimizer factory ``params -> optimizer`` (None: from ``training``)."""
    lr_scheduler: Any = None
    """A scheduler factory ``optimizer -> scheduler`` (None: from ``training``)."""


@dataclass
class LoopResult:
    """What the loop did: the final training set and one summary per round."""

    dataset: Path
    """Round 0 plus every round's labels: what the final student trains on."""
    round0: Path
    state_dir: Path
    rounds: list[dict[str, Any]]
    stop: str
    teacher_calls_round0: int
    """Labels of round 0 plus the calls of its teacher-driven sampling MD."""
    force_scale: float
    """eV/Å, the teacher's force std on round 0 (the unit of the trust window)."""
    seconds_round0: float
    target_force_ratio: float | None = None
    """The fresh-frame target the loop stopped on."""
    started: float = 0.0
    """``time.perf_counter()`` when the loop started (the report's total time counts from it)."""

    @property
    def teacher_calls_train(self) -> int:
        return self.teacher_calls_round0 + sum(r["teacher_calls"] for r in self.rounds)

    @property
    def teacher_calls_fresh(self) -> int:
        return sum(r["fresh_calls"] for r in self.rounds)

    def metrics(self) -> dict[str, Any]:
        """Flat metrics (``loop/...``, ``teacher_calls/...``, ``time/...``) for metrics.json."""
        out: dict[str, Any] = {
            "loop/rounds": len([r for r in self.rounds if r.get("trained", True)]),
            "loop/stop": self.stop,
            "teacher_calls/round0": self.teacher_calls_round0,
            "teacher_calls/train": self.teacher_calls_train,
            "teacher_calls/loop_fresh": self.teacher_calls_fresh,
            "time/round0_s": self.seconds_round0,
            "time/rounds_s": sum(sum(r["seconds"].values()) for r in self.rounds),
        }
        for r in self.rounds:
            prefix = f"loop/round_{r['round']}"
            out[f"{prefix}/teacher_calls"] = r["teacher_calls"]
            out[f"{prefix}/selected"] = r["selected"]
            if r.get("fresh"):
                out[f"{prefix}/fresh_force_mae"] = r["fresh"]["force_mae"]
                out[f"{prefix}/fresh_force_mae_rel"] = r["fresh"]["force_mae_rel"]
        return out

    def learning_curve(self) -> list[tuple[int, float]]:
        """(training-label teacher calls the round's students had, their fresh-frame force MAE / std)."""
        return [(r["train_calls"], r["fresh"]["force_mae_rel"]) for r in self.rounds if r.get("fresh")]


class ActiveLoop:
    """Runs the rounds (see the module docstring). ``teacher_factory`` builds the teacher's calculator, only
    when something is left to label; ``hook(stage)`` is called at each stage boundary and epoch (tests use it
    to interrupt a round)."""

    def __init__(
        self,
        config: ActiveLoopConfig,
        sampling: SamplingConfig,
        teacher_factory: Callable[[], Any],
        recipe: StudentRecipe,
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.sampling = sampling
        self.teacher_factory = teacher_factory
        self.recipe = recipe
        self.hook = hook or (lambda stage: None)
        self._teacher: Any = None
        self._check_budget()

    # ------------------------------------------------------------------ setup
    def _check_budget(self) -> None:
        """Round 0 alone must fit in the budget (checked before any work, on its largest possible size)."""
        budget = self.config.teacher_budget
        if budget is None:
            return
        s = self.sampling
        most, calls = s.largest_cost()
        if calls > budget:
            raise ValueError(
                f"distill.teacher_budget={budget} is below what round 0 may cost: up to {most} structures x "
                f"{s.teacher_calls_per_structure()} calls + {s.md_teacher_calls()} calls of teacher-driven MD + "
                f"{s.seed_teacher_calls()} calls placing the seeds at the teacher's volume = "
                f"{calls} teacher calls. Raise the budget or sample less in round 0 (data.source.num_rattle, "
                "volume_scan, snapshots_per_run, temperatures, hessian_rows, or md_driver: emt)."
            )

    def most_structures(self) -> int:
        """The most structures the final training set can hold: round 0's largest size plus every round's
        ``per_round``, and no more than the budget pays for once round 0's MD and seeds are paid (before
        deduplication makes it smaller)."""
        most = self.sampling.most_structures() + self.config.rounds * self.config.per_round
        budget = self.config.teacher_budget
        if budget is not None:
            s = self.sampling
            most = min(most, (budget - s.overhead_teacher_calls()) // s.teacher_calls_per_structure())
        return most

    def state_directory(self) -> Path:
        """The keyed directory holding the rounds."""
        if self.config.state_dir is not None:
            return Path(self.config.state_dir)
        key = cache_key(
            canonical(
                {
                    "loop_version": LOOP_VERSION,
                    "round0": self.sampling.cache_config(),
                    "loop": self.config.key_config(),
                    "student": self.recipe.fingerprint,
                }
            )
        )
        base = Path(self.sampling.cache_dir) if self.sampling.cache_dir is not None else default_cache_dir()
        return base / f"active_{self.sampling.name()}_{self.sampling.teacher}_{key}"

    @property
    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher = self.teacher_factory()
        return self._teacher

    def _say(self, message: str) -> None:
        announce(message, self.config.progress)

    # ------------------------------------------------------------------ the rounds
    def run(self) -> LoopResult:
        """Round 0, then rounds until a stop; returns where the final training set is."""
        from ..teachers.labelling import read_labelled

        started = time.perf_counter()
        round0 = Path(self.sampling())
        seconds_round0 = time.perf_counter() - started
        round0_structures = read_labelled(round0)
        calls0 = total_teacher_calls(round0_structures) + self.sampling.overhead_teacher_calls()
        budget = self.config.teacher_budget
        if budget is not None and calls0 > budget:
            raise ValueError(f"Round 0 cost {calls0} teacher calls, more than distill.teacher_budget={budget}.")
        # The force scale and the bounds come from what MD and the copies of the seeds measure: the contact
        # copies (train_only) hold forces of tens of eV/Å and pairs pushed inside the bounds on purpose.
        measured = [atoms for atoms in round0_structures if not is_train_only(atoms)]
        forces = np.concatenate([atoms.get_forces().reshape(-1) for atoms in measured])
        self.force_scale = float(forces.std())
        # Per element pair too: in water the O-H bond sets the overall bound (0.49 Å), and a run whose oxygens
        # met at 0.85 Å went on to give candidates (labelled by the teacher with forces of 40-60 eV/Å).
        self.bound, self.pair_bounds = sampled_bounds(round0_structures, self.config.min_distance_fraction)
        state = self.state_directory()
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.round0 = round0
        with exclusive_lock(state / "state.lock"):
            config_file = state / "config.json"
            if not config_file.exists():
                description = {
                    "round0": str(round0),
                    "loop": self.config.key_config(),
                    "student": self.recipe.fingerprint,
                }
                write_text_atomic(config_file, json.dumps(canonical(description), indent=2, sort_keys=True) + "\n")
            self._say(
                f"Active loop: round 0 = {len(round0_structures)} structures ({calls0} teacher calls); state in {state}"
            )
            rounds: list[dict[str, Any]] = []
            used, stop = calls0, "round limit"
            per_structure = self.sampling.teacher_calls_per_structure()
            for r in range(1, self.config.rounds + 1):
                if budget is not None and budget - used < per_structure:
                    stop = "teacher budget spent"
                    break
                summary = self._round(r, used)
                rounds.append(summary)
                used += summary["teacher_calls"]
                if summary["stop"]:
                    stop = summary["stop"]
                    break
            dataset = self._train_set(len(rounds) + 1)
        self._say(f"Active loop done ({stop}): {used} teacher calls for training labels; final set {dataset}")
        return LoopResult(
            dataset,
            round0,
            state,
            rounds,
            stop,
            calls0,
            self.force_scale,
            seconds_round0,
            self.config.target_force_ratio,
            started,
        )

    def _round_dir(self, r: int) -> Path:
        return self.state / f"round_{r:03d}"

    def _train_set(self, r: int) -> Path:
        """Round 0 plus the labels of rounds 1 .. r-1 (what round r's committee trains on), written once."""
        path = self.state / f"train_set_{r:03d}.extxyz"
        if not path.exists():
            parts = [self.round0] + [self._round_dir(i) / "labelled.extxyz" for i in range(1, r)]
            text = "".join(p.read_text() for p in parts if p.exists())
            write_text_atomic(path, text)
        return path

    def _round(self, r: int, used: int) -> dict[str, Any]:
        from ..teachers.labelling import keep_first_structures, label_structures, read_labelled

        directory = self._round_dir(r)
        summary_file = directory / "summary.json"
        if summary_file.exists():
            summary = json.loads(summary_file.read_text())
            self._say(f"Round {r}: done before ({summary['selected']} structures labelled); reusing it")
            return summary
        directory.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}
        clock = time.perf_counter()
        train_set = self._train_set(r)
        self._adopt(r, train_set)
        training_structures = read_labelled(train_set)
        members, validation = [], []
        for k in range(self.config.members):
            model, val = self._train_member(r, k, train_set, len(training_structures))
            members.append(model)
            validation.append(val)
        seconds["train"] = time.perf_counter() - clock

        clock = time.perf_counter()
        candidates = self._explore(r, members, training_structures)
        seconds["explore"] = time.perf_counter() - clock
        self.hook(f"round{r}/explored")

        clock = time.perf_counter()
        fresh, pool = self._reserve_fresh(r, candidates)
        fresh_metrics: dict[str, float] = {}
        fresh_calls = 0
        if fresh:
            fresh_path = label_structures(
                fresh, self.teacher, directory / "fresh.extxyz", chunk_size=self.sampling.chunk_size, progress=False
            )
            fresh_labelled = read_labelled(fresh_path)
            fresh_calls = total_teacher_calls(fresh_labelled)
            from ..evaluation import evaluate_structures

            fresh_metrics = evaluate_structures(members[0], fresh_labelled, metric_groups_key=None).metrics
        seconds["fresh"] = time.perf_counter() - clock
        self.hook(f"round{r}/fresh")

        stop = None
        ratio = fresh_metrics.get("force_mae_rel", math.inf)
        if fresh and ratio <= self.config.target_force_ratio:
            stop = "fresh-frame target reached"
            selected, counts = [], {"below_window": 0, "in_window": 0, "above_window": 0}
        else:
            budget = self.config.teacher_budget
            limit = self.config.per_round
            if budget is not None:
                limit = min(limit, (budget - used) // self.sampling.teacher_calls_per_structure())
            selected, counts = self._select(r, pool, training_structures, limit)
        selected_path = directory / "selected.extxyz"
        if not selected_path.exists():  # the selection is deterministic; the file makes a resumed round label it
            write_structures(selected_path, selected)
        selected = read_labelled(selected_path) if selected_path.stat().st_size else []
        self.hook(f"round{r}/selected")

        clock = time.perf_counter()
        calls = 0
        keep_first_structures(directory / "labelled.extxyz", len(selected))  # adopted beyond this selection
        if selected:
            # The round's labels are round 0's kind (data.source): the same rows, site energies and workers.
            labelled_path = label_like_round0(
                selected,
                self.sampling,
                self.teacher if self.sampling.label_workers == 1 else None,
                directory / "labelled.extxyz",
                self.sampling.seed + r,
                self.config.progress,
            )
            calls = total_teacher_calls(read_labelled(labelled_path))
        seconds["label"] = time.perf_counter() - clock
        self.hook(f"round{r}/labelled")

        summary = {
            "round": r,
            "members": len(members),
            "train_structures": len(training_structures),
            "train_calls": used,
            "val_force_mae": validation,
            "candidates": len(candidates),
            "unstable_runs": len({c.info["md_run"] for c in candidates if c.info.get("unstable")}),
            **counts,
            "selected": len(selected),
            "teacher_calls": calls,
            "fresh_calls": fresh_calls,
            "fresh": fresh_metrics,
            "seconds": {name: round(value, 2) for name, value in seconds.items()},
            "stop": stop,
        }
        write_text_atomic(summary_file, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        fresh_text = f"fresh-frame force MAE {fresh_metrics['force_mae']:.1f} meV/Å ({100 * ratio:.1f} % of std)"
        self._say(
            f"Round {r}: {len(candidates)} candidates, {len(selected)} labelled ({calls} teacher calls); "
            + (fresh_text if fresh_metrics else "no fresh frames")
            + (f"; stop: {stop}" if stop else "")
        )
        return summary

    # ------------------------------------------------------------------ adoption
    def _siblings(self) -> list[Path]:
        """State directories that differ from this one by the budget alone (none with an explicit state_dir)."""
        if self.config.state_dir is not None:
            return []

        def settings(state: Path) -> dict[str, Any]:
            # Round 0 is compared by content (each round's training set), not by its path: caches get moved.
            description = json.loads((state / "config.json").read_text())
            loop = {k: v for k, v in description.get("loop", {}).items() if k != "teacher_budget"}
            return {"loop": loop, "student": description.get("student")}

        mine = settings(self.state)
        pattern = f"active_{self.sampling.name()}_{self.sampling.teacher}_*"
        return [
            other
            for other in sorted(self.state.parent.glob(pattern))
            if other != self.state and (other / "config.json").is_file() and settings(other) == mine
        ]

    def _adopt(self, r: int, train_set: Path) -> None:
        """Copy round ``r`` from a sibling state whose finished round ``r`` trained on the same set (the one
        with the most labels): committee, candidates, fresh frames and labels; this budget's selection then
        takes what it needs of the labels and labels the rest."""
        import shutil

        from ..teachers.labelling import cost_path

        directory = self._round_dir(r)
        if (directory / "summary.json").exists() or any(directory.glob("member_*")):
            return  # this state's own work, finished or under way
        donors = []
        for other in self._siblings():
            round_dir = other / directory.name
            theirs = other / train_set.name
            if (
                (round_dir / "summary.json").is_file()
                and theirs.is_file()
                and theirs.read_bytes() == train_set.read_bytes()
            ):
                summary = json.loads((round_dir / "summary.json").read_text())
                donors.append((summary["selected"], round_dir))
        if not donors:
            return
        selected, source = max(donors, key=lambda donor: donor[0])
        temporary = directory.with_name(directory.name + ".adopting")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        for k in range(self.config.members):
            member = temporary / f"member_{k}"
            member.mkdir()
            for name in ("best_model.pt", "done.json"):
                shutil.copy2(source / f"member_{k}" / name, member / name)
        for name in ("candidates.extxyz", "fresh.extxyz", "labelled.extxyz"):
            for path in (source / name, cost_path(source / name)):
                if path.is_file():
                    shutil.copy2(path, temporary / path.name)
        if directory.exists():
            directory.rmdir()  # empty: checked above that nothing of this state's own is in it
        temporary.rename(directory)
        self._say(
            f"Round {r}: adopted from {source.parent.name} (the same training set, another budget): its committee, "
            f"candidates, fresh frames and {selected} labels"
        )

    # ------------------------------------------------------------------ committee
    def _train_member(self, r: int, k: int, train_set: Path, size: int) -> tuple[nn.Module, float]:
        """Member ``k`` of round ``r``, trained (or resumed, or loaded when done) on ``train_set`` (``size``
        structures); returns (model, best validation force MAE). A member holds out a tenth of the set (at least
        2, at most ``data_options["num_val"]``) for its best-model choice: round 0 is small."""
        import torch

        from ..data.module import AtomsDataModule
        from ..training import Trainer, load_model_weights
        from ..training.checkpoint import resume_candidates

        directory = self._round_dir(r) / f"member_{k}"
        done_file = directory / "done.json"
        seed = self.config.seed + 1000 * k
        options = dict(self.recipe.data_options)
        options["num_val"] = min(int(options.get("num_val", 2)), max(2, size // 10))
        data = AtomsDataModule(path=str(train_set), seed=seed, num_test=0, **options)
        torch.manual_seed(seed)
        model = self.recipe.build_model(data.statistics)
        if done_file.exists():
            load_model_weights(model, directory / "best_model.pt")
            return model, float(json.loads(done_file.read_text())["val_force_mae"])
        if r > 1:  # warm start: the same member of the previous round
            load_model_weights(model, self._round_dir(r - 1) / f"member_{k}" / "best_model.pt")
        extra = {name: value for name, value in self.recipe.training.extra.items() if name == "model_config"}
        config = dataclasses.replace(
            self.recipe.training,
            checkpoint_dir=str(directory),
            max_epochs=self.config.epochs if r == 1 else self.config.warm_epochs,
            seed=seed,
            extra=extra,
        )
        trainer = Trainer(
            model,
            data.train_loader(),
            data.val_loader(),
            config=config,
            loss_fn=self.recipe.build_loss(),
            optimizer=self.recipe.optimizer,
            lr_scheduler=self.recipe.lr_scheduler,
            loggers=[],
            callbacks={"active_loop": _StageCallback(self.hook, f"round{r}/train/member{k}")},
        )
        if resume_candidates(directory):
            trainer.load_checkpoint(directory)
        self._say(f"Round {r}: training committee member {k + 1}/{self.config.members} on {train_set.name}")
        trainer.fit()
        load_model_weights(model, directory / "best_model.pt")
        val = trainer.history.get("val/force_mae", [math.nan])
        finite = [v for v in val if math.isfinite(v)]
        best = min(finite) if finite else math.nan
        write_text_atomic(done_file, json.dumps({"val_force_mae": best}) + "\n")
        return model, best

    # ------------------------------------------------------------------ exploration
    def _explore(self, r: int, members: list[nn.Module], training: list[Atoms]) -> list[Atoms]:
        """Candidate frames of round ``r`` with their committee scores (computed once, then read back)."""
        from ..md.driver import MDSettings, run_md, seed_from
        from ..md.potential import StudentPotential
        from ..teachers.labelling import read_labelled

        path = self._round_dir(r) / "candidates.extxyz"
        if path.exists():
            return read_labelled(path)
        explore = self.config.explore
        targets = explore.temperatures or list(self.sampling.temperatures)
        if not targets:
            raise ValueError(
                "The active loop needs target temperatures: set distill.explore.temperatures or "
                "data.source.temperatures."
            )
        temperatures = list(targets)
        if explore.hot_factor > 0:
            temperatures.append(explore.hot_factor * max(targets))
        plan = [(variant, t) for variant in explore.variants for t in temperatures]
        runs = explore.runs or len(plan)
        rng = np.random.default_rng([self.config.seed, r, 7])
        driver = StudentPotential(members[0])
        # Not from a contact copy (train_only): its pushed pair would spring apart into a hot, off-target run.
        starts = [atoms for atoms in training if not is_train_only(atoms)]
        frames: list[Atoms] = []
        for run in range(runs):
            variant, temperature = plan[run % len(plan)]
            start = fresh_copy(starts[int(rng.integers(len(starts)))])
            if start.pbc.all() and variant == "strained":
                start.set_cell(start.cell.array @ random_strain(rng, explore.strain_max), scale_atoms=True)
            elif start.pbc.all() and variant == "large":
                start = supercell(start, explore.large_atoms)
            elif not start.pbc.all():
                variant = "plain"
            settings = MDSettings(
                ensemble="nvt",
                temperature_K=float(temperature),
                timestep_fs=explore.timestep_fs if explore.timestep_fs is not None else default_timestep_fs(start),
                steps=explore.steps_in(r),
                friction_per_ps=1000.0 * explore.friction_per_fs,
                thermo_interval=explore.frame_interval,
                write_interval=explore.frame_interval,
                min_distance=self.bound,
                pair_min_distance=self.pair_bounds,
                seed=seed_from(self.config.seed, r, run, 13),
                equilibration_steps=explore.equilibration_steps,
            )
            result = run_md(driver, start, settings, keep_frames=True)
            kept = result.frames
            if not result.stable:
                log.info(
                    "Round %d exploration run %d (%s, %g K) became unstable: %s",
                    r,
                    run,
                    variant,
                    temperature,
                    result.reason,
                )
            unstable = set(range(len(kept))[-explore.unstable_frames :]) if explore.unstable_frames else set()
            for index, frame in enumerate(kept):
                step = int(frame.info["step"])
                info = dict(
                    provenance=f"explore:round={r}:run={run}:driver=student:T={temperature:g}K:variant={variant}:step={step}",
                    config_type=f"explore_{temperature:g}K",
                    round=r,
                    driver="student",
                    md_run=f"explore_r{r}_{run}",
                    md_snapshot=step,
                    temperature_K=float(temperature),
                    variant=variant,
                    target=int(temperature in targets),
                )
                if not result.stable and index in unstable:
                    info["unstable"] = 1
                frames.append(fresh_copy(frame, **info))
        if len(members) >= 2:
            from .committee import committee_deviation

            # A member whose forces are not finite makes the score inf: stored as a huge, finite number.
            for frame, score in zip(frames, committee_deviation(members, frames)):
                frame.info["score"] = float(score) if math.isfinite(score) else 1e9
        write_structures(path, frames)
        return read_labelled(path) if frames else []

    def _reserve_fresh(self, r: int, candidates: list[Atoms]) -> tuple[list[Atoms], list[Atoms]]:
        """(fresh-frame test frames, the rest): fresh frames are drawn among plain-cell frames at the targets."""
        count = self.config.fresh_per_round
        eligible = [i for i, c in enumerate(candidates) if c.info.get("target") and c.info.get("variant") == "plain"]
        eligible = eligible or [i for i, c in enumerate(candidates) if c.info.get("target")]
        rng = np.random.default_rng([self.config.seed, r, 11])
        chosen = set(rng.permutation(eligible)[:count].tolist()) if eligible and count else set()
        fresh = [candidates[i] for i in sorted(chosen)]
        for atoms in fresh:
            atoms.info["fresh"] = 1
        return fresh, [c for i, c in enumerate(candidates) if i not in chosen]

    # ------------------------------------------------------------------ selection
    def _select(
        self, r: int, pool: list[Atoms], training: list[Atoms], limit: int
    ) -> tuple[list[Atoms], dict[str, int]]:
        """The structures to label this round, best first, and how the candidates fell against the window."""
        low, high = self.config.trust_low * self.force_scale, self.config.trust_high * self.force_scale
        scores = np.array([c.info.get("score", np.nan) for c in pool], dtype=float)
        counts = {
            "below_window": int((scores < low).sum()),
            "in_window": int(((scores >= low) & (scores <= high)).sum()),
            "above_window": int((scores > high).sum()),
        }
        if self.config.selection == "random":
            order = np.random.default_rng([self.config.seed, r, 17]).permutation(len(pool)).tolist()
            for atoms in pool:
                atoms.info["selection"] = "random"
        else:
            unstable = [i for i, c in enumerate(pool) if c.info.get("unstable")]
            astray = self._astray(pool, scores, high, set(unstable))
            window = [i for i in np.argsort(-scores, kind="stable").tolist() if low <= scores[i] <= high]
            reason = (
                {i: "committee" for i in window} | {i: "astray" for i in astray} | {i: "unstable" for i in unstable}
            )
            order = unstable + astray + [i for i in window if reason[i] == "committee"]
            for i in order:
                pool[i].info["selection"] = reason[i]
        chosen: list[Atoms] = []
        per_run: dict[str, int] = {}
        reference = _Fingerprints(training, self.config.dedup_tolerance)
        for i in order:
            if len(chosen) >= limit:
                break
            atoms = pool[i]
            run = str(atoms.info["md_run"])
            if per_run.get(run, 0) >= self.config.max_per_run or not reference.add_if_new(atoms):
                continue
            per_run[run] = per_run.get(run, 0) + 1
            chosen.append(atoms)
        return chosen, counts

    def _astray(self, pool: list[Atoms], scores: np.ndarray, high: float, taken: set[int]) -> list[int]:
        """The first ``astray_frames`` frames of each run that scored above the window, in the runs' order."""
        if not self.config.astray_frames:
            return []
        onsets: dict[str, list[int]] = {}
        for i in sorted(range(len(pool)), key=lambda i: int(pool[i].info["md_snapshot"])):
            if scores[i] > high and i not in taken:
                onsets.setdefault(str(pool[i].info["md_run"]), []).append(i)
        return [i for run in onsets.values() for i in run[: self.config.astray_frames]]


class _Fingerprints:
    """Structures seen so far, by (composition, periodicity): which new ones are not near-duplicates."""

    def __init__(self, structures: list[Atoms], tolerance: float) -> None:
        self.tolerance = tolerance
        self.groups: dict[tuple, list[np.ndarray]] = {}
        self._structures = list(structures)
        self._indexed = False

    def _key(self, atoms: Atoms) -> tuple:
        return (tuple(np.sort(atoms.numbers)), tuple(atoms.pbc))

    def add_if_new(self, atoms: Atoms) -> bool:
        from ..teachers.sampling import fingerprint

        key = self._key(atoms)
        if not self._indexed:  # fingerprints of the training set, only for compositions that come up
            self._pending = {}
            for other in self._structures:
                self._pending.setdefault(self._key(other), []).append(other)
            self._indexed = True
        if key in self._pending:
            self.groups.setdefault(key, []).extend(fingerprint(other) for other in self._pending.pop(key))
        vector = fingerprint(atoms)
        others = self.groups.setdefault(key, [])
        if others and np.abs(np.stack(others) - vector).max(axis=1).min() <= self.tolerance:
            return False
        others.append(vector)
        return True


class _StageCallback(Callback):
    """Tells the loop's hook about every finished training epoch (``.../epoch<N>``, N counted from 1, before
    that epoch's checkpoint is written)."""

    def __init__(self, hook: Callable[[str], None], stage: str) -> None:
        self.hook, self.stage = hook, stage

    def on_train_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.hook(f"{self.stage}/epoch{trainer.epoch}")
