"""How ``mlff-train`` runs a distillation recipe: the one place that turns its Hydra config into the active loop
(:mod:`.loop`) and the report with its verdict (:mod:`.report`). ``train.py`` calls :func:`active_loop` before
building the data, :func:`final_report` after training and :func:`check_verdict` after writing metrics.json.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ..cli import CLIError
from .gate import DistillationFailed, advice, sampled_bounds

if TYPE_CHECKING:
    from ..training import TrainingConfig
    from .loop import ActiveLoopConfig, LoopResult

log = logging.getLogger(__name__)

# Model options added after rounds were first cached: at these values they leave the key as it was (the model is
# the one built before they existed), so that adding an option does not throw away every cached loop.
_MODEL_OPTIONS_OFF = {"zbl": False}

# TrainingConfig fields that do not change what a committee member learns (paths, logging, devices, and
# max_epochs, which the loop sets itself).
_NOT_IN_KEY = {
    "checkpoint_dir",
    "overwrite_checkpoints",
    "keep_last",
    "checkpoint_every_n_steps",
    "handle_signals",
    "log_interval",
    "device",
    "extra",
    "max_epochs",
}


def _sampling(cfg: DictConfig, what: str) -> Any:
    from hydra.utils import instantiate

    from ..teachers.sampling import SamplingConfig

    source = instantiate(cfg.data.source) if cfg.data.get("source") is not None else None
    if not isinstance(source, SamplingConfig):
        raise CLIError(
            f"{what} needs data=distill (data.source a SamplingConfig: the system, its seeds and target "
            f"temperatures); got data.source={None if source is None else type(source).__name__}."
        )
    return source


def model_key(model: dict[str, Any]) -> dict[str, Any]:
    """The committee's model config as the loop's state key holds it: options newer than the cached rounds are
    left out at their off values (:data:`_MODEL_OPTIONS_OFF`)."""
    return {k: v for k, v in model.items() if not (k in _MODEL_OPTIONS_OFF and v == _MODEL_OPTIONS_OFF[k])}


def loop_settings(cfg: DictConfig) -> tuple[ActiveLoopConfig, DictConfig]:
    """The recipe's ``distill`` node as the loop's config and the committee's model config
    (``distill.committee_model``, or the recipe's ``model`` when that is null); errors name the key."""
    from .loop import ActiveLoopConfig

    options = OmegaConf.to_container(cfg.distill, resolve=True)
    given = options.pop("committee_model", None)
    if given is not None and (not isinstance(given, dict) or "_target_" not in given):
        raise CLIError(
            f"distill.committee_model must be a model config with a _target_ (e.g. "
            f"model@distill.committee_model=schnet) or null (the committee uses the recipe's model); got {given!r}."
        )
    try:
        loop_config = ActiveLoopConfig.from_dict(options)
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from None
    return loop_config, cfg.model if given is None else cfg.distill.committee_model


def active_loop(cfg: DictConfig, training_config: TrainingConfig) -> LoopResult | None:
    """Run the recipe's active loop (``distill``; None when the recipe has none) and return where its final
    training set is; a finished round is never recomputed, a killed one continues."""
    if cfg.get("distill") is None:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("The active loop (distill) runs on one process; start mlff-train without torchrun.")
    from hydra.utils import instantiate

    from ..teachers.calculators import make_calculator
    from ..training import TrainingInterrupted
    from .loop import ActiveLoop, StudentRecipe

    started = time.perf_counter()
    sampling = _sampling(cfg, "distill (the active loop)")
    loop_config, committee_model = loop_settings(cfg)
    data_keys = ("cutoff", "num_val", "batch_size", "val_batch_size", "num_workers", "energy_key", "forces_key")
    data_options = {key: cfg.data.get(key) for key in (*data_keys, "group_key") if key in cfg.data}
    training = {k: v for k, v in dataclasses.asdict(training_config).items() if k not in _NOT_IN_KEY}
    fingerprint = {
        "model": model_key(OmegaConf.to_container(committee_model, resolve=True)),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "training": training,
        "data": data_options,
    }
    scheduler = cfg.get("scheduler")
    recipe = StudentRecipe(
        build_model=lambda statistics: instantiate(committee_model, statistics=statistics),
        build_loss=lambda: instantiate(cfg.loss),
        training=training_config,
        data_options=data_options,
        fingerprint=fingerprint,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(scheduler) if scheduler and "_target_" in scheduler else None,
    )
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    try:
        loop = ActiveLoop(loop_config, sampling, lambda: make_calculator(teacher["name"], **teacher["kwargs"]), recipe)
    except ValueError as error:  # the budget cannot hold round 0: said before any work
        raise CLIError(str(error)) from None
    held_out = int(cfg.data.get("num_val") or 0) + int(cfg.data.get("num_test") or 0)
    most = loop.most_structures() - sampling.num_contacts  # contact copies are never held out
    if most <= held_out:
        calls = sampling.teacher_calls_per_structure()
        raise CLIError(
            f"The final training set can hold at most {most} structures"
            f"{f' besides {sampling.num_contacts} contact copies' if sampling.num_contacts else ''} (round 0 and "
            f"distill.rounds x distill.per_round, as far as distill.teacher_budget={loop_config.teacher_budget} "
            f"pays for them at {calls} teacher call{'s' if calls != 1 else ''} each), too few for "
            f"data.num_val={cfg.data.num_val} and data.num_test={cfg.data.num_test} with any left to train on: "
            "lower them, raise the budget or make each structure cheaper (data.source.hessian_rows)."
        )
    try:
        result = loop.run()
    except TrainingInterrupted as error:
        log.warning(
            "The active loop was interrupted while training a committee member; run the same command again "
            "(without ckpt_path) and it continues from %s.",
            loop.state_directory(),
        )
        raise SystemExit(error.exit_code) from None
    result.started = started
    return result


def final_report(cfg: DictConfig, trainer: Any, data: Any, output_dir: Path, loop: LoopResult | None) -> dict[str, Any]:
    """The final student (best checkpoint, EMA weights) vs the teacher: the report and its verdict, as
    ``distill/...`` metrics (see :func:`mlff_distiller.distill.report.distillation_report`).

    When the gate's MD became unstable or its NVE drifted, and ``distill_report.refine.passes`` allows, the
    student learns from it (:mod:`.refine`): the frames before the failure are labelled and added to its training
    split, it trains on in ``checkpoints/refine_<p>/``, and the report runs again with seed + p (new trajectories:
    a pass is not graded on the trajectory it learned from); the last report is the run's. Each earlier report's
    files move to ``refine/pass_<p>/``. Then the refined student's test split is returned as ``test/...`` too,
    and ``distill/student_checkpoint`` names the checkpoint the verdict speaks of."""
    from ase.io import read

    from ..data.dataset import read_labelled_structures
    from ..teachers.calculators import make_calculator
    from ..training import load_model_weights
    from .refine import frames_within_budget
    from .report import GATE_FAILURE_FRAMES, ReportConfig, distillation_report, print_report

    best = trainer.checkpoint_dir / "best_model.pt" if trainer.checkpoint_dir is not None else None
    if best is None or not best.is_file() or not hasattr(data, "split_indices"):
        raise CLIError("distill_report needs the run's best_model.pt and a data module with a test split.")
    try:
        config = ReportConfig.from_dict(OmegaConf.to_container(cfg.distill_report, resolve=True))
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from None
    sampling = _sampling(cfg, "distill_report")
    targets = list(sampling.temperatures)
    if cfg.get("distill") is not None and (cfg.distill.get("explore") or {}).get("temperatures"):
        targets = list(cfg.distill.explore.temperatures)
    if not targets:
        raise CLIError("distill_report needs target temperatures (data.source.temperatures) for its MD.")
    budget = loop_settings(cfg)[0].teacher_budget if cfg.get("distill") is not None else None
    teacher = make_calculator(cfg.teacher.name, **OmegaConf.to_container(cfg.teacher.kwargs, resolve=True))
    # The closest-approach bound comes from round 0 (the sampled set), as in the loop's exploration: the
    # explored structures the loop added may hold closer contacts, which must not loosen the gate.
    sampled = read_labelled_structures(loop.round0 if loop is not None else data.split_files["train"])
    bound, pair_bounds = sampled_bounds(sampled, config.gate.min_distance_fraction)
    used = loop.teacher_calls_train if loop is not None else 0
    refined: dict[str, Any] = {}
    final_training = round(sum(trainer.history.get("epoch_time_s", [])), 2)
    extra: dict[str, Any] = {}
    for p in range(config.refine.passes + 1):
        started = time.perf_counter()
        best = trainer.checkpoint_dir / "best_model.pt"
        student = load_model_weights(copy.deepcopy(trainer.model).cpu(), best)
        in_file = read_labelled_structures(data.split_files["test"])
        test = [in_file[i] for i in data.split_indices["test"]]
        report = distillation_report(
            student,
            teacher,
            test,
            output_dir,
            sampling.teacher_seeds(teacher),  # the cells round 0 sampled (cached volumes: no new teacher calls)
            targets,
            config,
            loop,
            bound,
            # Each pass's MD (gate, fresh frames) draws new velocities: a refined student is not graded on the
            # trajectory it learned from (with the same seed one passed its gate and failed another's NVE at 3 ps).
            seed=int(cfg.seed or 0) + p,
            pair_bounds=pair_bounds,
            refined=refined,
        )
        report["time/final_training_s"] = final_training
        report["time/report_s"] = round(time.perf_counter() - started, 2)
        report["student_checkpoint"] = str(best)
        if loop is not None:
            report["time/total_s"] = round(time.perf_counter() - loop.started, 2)
        print_report(report)
        failure = output_dir / GATE_FAILURE_FRAMES
        if p == config.refine.passes or report.get("gate/passed") == 1.0 or not failure.is_file():
            break
        count = frames_within_budget(
            config.refine.frames,
            budget,
            used + refined.get("refine/teacher_calls", 0),
            sampling.teacher_calls_per_structure(),
        )
        if count == 0:
            log.warning("The gate failed, but distill.teacher_budget=%s leaves no teacher call to refine with.", budget)
            break
        # This pass's report files move aside: the next report is the run's.
        archive = _move_aside(output_dir, started, output_dir / "refine" / f"pass_{p}")
        clock = time.perf_counter()
        trainer, data, frames, calls = _refine(
            cfg,
            p + 1,
            read(archive / GATE_FAILURE_FRAMES, ":"),
            count,
            sampling,
            teacher,
            trainer,
            data,
            output_dir,
            config.refine.epochs,
        )
        refined = {
            **refined,
            "refine/passes": float(p + 1),
            "refine/frames": refined.get("refine/frames", 0.0) + frames,
            "refine/teacher_calls": refined.get("refine/teacher_calls", 0) + calls,
            "refine/seconds": refined.get("refine/seconds", 0.0) + round(time.perf_counter() - clock, 2),
            f"refine/pass_{p + 1}/gate_reasons": [r for r in report["reasons"] if "NVT" in r or "NVE" in r],
        }
        extra = trainer.evaluate_checkpoint(trainer.checkpoint_dir / "best_model.pt", data.test_loader(), "test")
    out = {f"distill/{name}": value for name, value in report.items()}
    return {**extra, **out}


def _move_aside(output_dir: Path, since: float, archive: Path) -> Path:
    """Move the files a report wrote into ``output_dir`` (top-level files changed since ``since``, logs excepted)
    to ``archive``; returns it."""
    archive.mkdir(parents=True, exist_ok=True)
    for path in sorted(output_dir.iterdir()):
        if path.is_file() and path.suffix != ".log" and path.stat().st_mtime >= since:
            path.rename(archive / path.name)
    return archive


def _refine(
    cfg: DictConfig,
    step: int,
    window: list[Any],
    count: int,
    sampling: Any,
    teacher: Any,
    trainer: Any,
    data: Any,
    output_dir: Path,
    epochs: int,
) -> tuple[Any, Any, int, int]:
    """Refinement pass ``step`` (:mod:`.refine`): label ``count`` of the gate's ``window`` frames, add them to the
    training split of ``data`` (which holds the earlier passes' frames already), train the student on.
    Returns (its trainer, its data, frames labelled, their teacher calls)."""
    from hydra.utils import instantiate

    from ..teachers.labelling import read_labelled
    from ..training import ConsoleLogger, load_model_weights
    from .budget import total_teacher_calls
    from .refine import fine_tune, label_like_round0, pick_frames, write_pass_sets

    work = output_dir / "refine" / f"pass_{step}"
    frames = pick_frames(window, count)
    log.info(
        "The gate's MD of the student failed; refinement pass %d: labelling %d of its frames before the failure, "
        "then training on for %d epochs.",
        step,
        len(frames),
        epochs,
    )
    labelled = label_like_round0(frames, sampling, teacher, work / "labelled.extxyz", sampling.seed + 100 + step)
    sets = write_pass_sets(data, [labelled], work)
    data = instantiate(cfg.data, path=str(sets["train"]), val_path=str(sets["val"]), test_path=str(sets["test"]))
    model = load_model_weights(copy.deepcopy(trainer.model), trainer.checkpoint_dir / "best_model.pt")
    scheduler = cfg.get("scheduler")
    trainer = fine_tune(
        model,
        data,
        trainer.config,
        output_dir / "checkpoints" / f"refine_{step}",
        epochs,
        instantiate(cfg.loss),
        instantiate(cfg.optimizer),
        instantiate(scheduler) if scheduler and "_target_" in scheduler else None,
        loggers=[ConsoleLogger(metrics=("train/loss", "val/loss", "val/force_mae"))],
    )
    return trainer, data, len(frames), total_teacher_calls(read_labelled(labelled))


def check_verdict(metrics: dict[str, Any]) -> None:
    """Raise :class:`DistillationFailed` (exit code 3) with the reasons and what to try when the verdict in
    ``metrics`` is ``fail``; call it after everything is written."""
    if metrics.get("distill/verdict") != "fail":
        return
    reasons = metrics.get("distill/reasons", [])
    raise DistillationFailed(
        "the distilled student failed its verdict (metrics.json: distill/verdict = fail): "
        + "; ".join(reasons)
        + f". Try: {advice(reasons)}."
    )
