"""``mlff-train``: the Hydra command line. It composes the config, instantiates the parts and hands
them to the Trainer; it holds no training logic.

Heavy imports (torch, tensorboard) happen inside the task function so that ``--help`` and
``--cfg job`` stay fast.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mlff_distiller.cli import (
    EXIT_VERDICT_FAILED,
    CLIError,
    fail,
    in_multirun,
    is_instantiation_error,
    log_to_file_only,
    print_metrics,
    task_overrides,
    write_json,
)
from mlff_distiller.training.config import ConfigError, TrainingConfig

log = logging.getLogger("mlff_distiller.train")

ConfigStore.instance().store(group="trainer", name="schema", node=TrainingConfig)

RUN_KEYS = ("ckpt_path", "allow_config_change", "auto_resume", "callbacks", "paths")
"""Top-level keys that say how to run, not what is trained: they may differ between a run and its
resumption. The ``trainer`` fields follow the Trainer's own list (``training.config.RESUMABLE_CHANGES``)."""
CONSOLE_METRICS = ("train/loss", "val/loss", "val/energy_mae_per_atom", "val/force_mae")
"""Shown in each epoch's console row (with the monitored metric, lr and time); train.log has every metric."""


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train with the composed config; returns the best monitored value (for sweepers such as Optuna)."""
    try:
        result = train(cfg)
        _leave_process_group()
        return result
    except Exception as error:
        from mlff_distiller.training.signals import TrainingInterrupted  # imports no torch: bad input fails fast

        if isinstance(error, TrainingInterrupted):
            overrides = " ".join(o for o in task_overrides() if not o.startswith("ckpt_path="))
            log.warning("Resume with: mlff-train %s ckpt_path=%s", overrides, Path(cfg.paths.output_dir))
            raise SystemExit(error.exit_code) from None
        if in_multirun():
            # One failed job (e.g. a trial whose learning rate diverges) must not end a sweep: Hydra
            # records the exception, sweepers such as Optuna count the trial as failed and go on.
            log.error("This job failed (%s: %s); the sweep goes on with the other jobs.", type(error).__name__, error)
            raise
        if isinstance(error, (CLIError, ConfigError)) or is_instantiation_error(error):
            fail("mlff-train", error)
        from mlff_distiller.distill.gate import DistillationFailed
        from mlff_distiller.teachers.calculators import TeacherUnavailableError
        from mlff_distiller.training import CheckpointError, NonFiniteLossError

        if isinstance(error, DistillationFailed):
            fail("mlff-train", error, EXIT_VERDICT_FAILED)
        if isinstance(error, (CheckpointError, NonFiniteLossError, TeacherUnavailableError)):
            fail("mlff-train", error)
        raise
    return None  # unreachable


def _leave_process_group() -> None:
    """Under torchrun, wait for every process, then leave the group together (a process that tears
    its connections down while another still uses them can abort)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mlff_distiller.training import distributed

        distributed.barrier()
        distributed.destroy()


def train(cfg: DictConfig) -> float | None:
    """Compose-then-run body of ``mlff-train``, callable from Python with a composed config: build what the
    config names, hand it to the Trainer, then test the best checkpoint and write ``metrics.json``."""
    training_config = _training_config(cfg)  # validates every field

    from hydra.utils import instantiate

    from mlff_distiller.memory import keep_freed_memory
    from mlff_distiller.training import ConsoleLogger, Trainer, distributed, seed_everything
    from mlff_distiller.training.optim import check_factory

    keep_freed_memory()  # training steps reuse their large tensors instead of faulting in fresh pages each step
    # Under torchrun: join the process group (gloo on CPU, nccl on GPUs); only rank 0 writes files.
    distributed.init_from_env(training_config.device)
    training_config.device = distributed.local_device(training_config.device)
    main_process = distributed.rank() == 0
    if not main_process:
        _stop_file_logging()
    log_to_file_only()  # every epoch's and table's full figures go to the log file; the console shows tables
    # Everything that can be checked is checked before any work (data generation, labelling) starts.
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") and "_target_" in cfg.scheduler else None
    check_factory(optimizer, "optimizer")
    if scheduler is not None:
        check_factory(scheduler, "scheduler")
    resume_path, resume_state = _resolve_resume(cfg, training_config)
    if cfg.get("teacher") is not None and cfg.data.get("path") is None:
        from mlff_distiller.teachers.calculators import require_teacher

        require_teacher(cfg.teacher.name)  # a missing teacher package stops the run before any work

    output_dir = Path(cfg.paths.output_dir)
    training_config.extra = {
        "run_config": OmegaConf.to_container(cfg, resolve=False),
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),  # rebuilds the student later
        "overrides": task_overrides(),
    }

    from mlff_distiller.distill.compose import active_loop, check_verdict, final_report

    loop = active_loop(cfg, training_config)  # a distillation recipe's rounds; None without `distill`
    if cfg.seed is not None:
        seed_everything(cfg.seed)  # model initialisation and data generation are reproducible too
    data = instantiate(cfg.data, **({"path": str(loop.dataset)} if loop is not None else {}))
    statistics = getattr(data, "statistics", None)
    model = instantiate(cfg.model, **({"statistics": statistics} if statistics is not None else {}))
    loss = instantiate(cfg.loss)
    if getattr(data, "metric_groups", None) and hasattr(loss, "metric_groups"):
        loss.metric_groups = data.metric_groups  # per-config-type metrics need the group names
    trainer = Trainer(
        model=model,
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=training_config,
        loss_fn=loss,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        loggers=[ConsoleLogger(metrics=CONSOLE_METRICS)]
        + [instantiate(node) for node in (cfg.get("logger") or {}).values()],
        callbacks={name: instantiate(node) for name, node in (cfg.get("callbacks") or {}).items() if node},
    )
    if resume_state is not None:
        trainer.load_state_dict(resume_state, source=str(resume_path), strict_config=not cfg.allow_config_change)
        log.info(
            "Resuming %s at epoch %d (step %d) into %s", resume_path, trainer.epoch, trainer.global_step, output_dir
        )
    history = trainer.fit()

    metrics: dict[str, Any] = {name: values[-1] for name, values in history.items() if values}
    metrics.update(
        {
            "best/" + trainer.monitor: trainer.best_metric,
            "best/epoch": trainer.best_epoch,
            "global_step": trainer.global_step,
        }
    )
    metrics.update(_evaluate_test_split(trainer, data, show=main_process))
    if cfg.get("distill_report") and main_process:
        metrics.update(final_report(cfg, trainer, data, output_dir, loop))
    if main_process:
        write_json(output_dir / "metrics.json", metrics)
    check_verdict(metrics)  # a failed distillation verdict exits with code 3, after everything is written
    log.info(
        "Best %s = %s at epoch %s; outputs in %s", trainer.monitor, trainer.best_metric, trainer.best_epoch, output_dir
    )
    # A run whose monitored metric never became finite reports NaN (a failed trial for sweepers).
    return trainer.best_metric if trainer.best_metric is not None else math.nan


def _training_config(cfg: DictConfig) -> TrainingConfig:
    """The ``trainer`` group as a validated TrainingConfig. On the command line the optimizer and the
    scheduler are chosen with their groups; the Python API's names for them must stay unset."""
    config: TrainingConfig = OmegaConf.to_object(cfg.trainer)
    for field, group, example in (("optimizer", "optimizer", "adamw"), ("lr_scheduler", "scheduler", "plateau")):
        if getattr(config, field) is not None:
            raise CLIError(
                f"trainer.{field}={getattr(config, field)!r}: on the command line the {group} is chosen with the "
                f"'{group}' group (e.g. {group}={example}); trainer.{field} is only read by the Python API."
            )
    return config


def _stop_file_logging() -> None:
    """Processes other than rank 0 keep their console output but leave the run's log file to rank 0."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _evaluate_test_split(trainer: Any, data: Any, show: bool = True) -> dict[str, float]:
    """The best checkpoint's weights (EMA weights when kept) on the test split, shown as a table."""
    test_loader = data.test_loader() if hasattr(data, "test_loader") else None
    best = trainer.checkpoint_dir / "best_model.pt" if trainer.checkpoint_dir is not None else None
    if test_loader is None or best is None or not best.is_file():
        if test_loader is not None:
            log.warning("No best_model.pt in %s: the test split was not evaluated.", trainer.checkpoint_dir)
        return {}
    results = trainer.evaluate_checkpoint(best, test_loader, prefix="test")
    if hasattr(data, "force_std"):
        results["test/force_std"] = 1e3 * data.force_std("test")
    if show:
        title = f"Test split: {len(data.datasets['test'])} structures, best model (epoch {trainer.best_epoch})"
        print_metrics(results, title)
    return results


def _resolve_resume(cfg: DictConfig, training_config: TrainingConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """Find and check the checkpoint named by ``ckpt_path`` (or, with ``auto_resume``, the run's own
    checkpoints, as a requeued cluster job finds them); a resume that cannot be honoured is an error."""
    from mlff_distiller.training.checkpoint import read_checkpoint, resume_candidates
    from mlff_distiller.training.config import RESUMABLE_CHANGES, resume_differences

    ckpt_path, checkpoint_dir = cfg.get("ckpt_path"), training_config.checkpoint_dir
    if not ckpt_path and cfg.get("auto_resume") and checkpoint_dir and resume_candidates(Path(checkpoint_dir)):
        ckpt_path = checkpoint_dir
        log.info("auto_resume: continuing the run in %s", checkpoint_dir)
    if not ckpt_path:
        return None, None
    path = Path(str(ckpt_path)).expanduser()
    if not path.exists():
        raise CLIError(
            f"ckpt_path={str(path)!r} does not exist; pass a checkpoint file (last.pt, best_model.pt) "
            "or a run directory."
        )
    # A run directory: its newest readable checkpoint; unreadable newer files are skipped with a warning.
    path, state = read_checkpoint(path)
    saved = state.get("config", {})
    if "run_config" not in saved.get("extra", {}):
        raise CLIError(
            f"ckpt_path={str(path)!r} was not written by mlff-train (no run config inside); resume it "
            "from Python with Trainer.load_checkpoint."
        )
    # The groups must be the saved ones; the trainer fields follow the Trainer's list of what may change.
    ignored = (*RUN_KEYS, "trainer")
    saved_run = dict(saved["extra"]["run_config"])
    if isinstance(saved_run.get("scheduler"), dict):  # runs from before the Trainer set a cosine's T_max
        saved_run["scheduler"] = {k: v for k, v in saved_run["scheduler"].items() if k != "T_max"}
    differences = _config_differences(
        {k: v for k, v in saved_run.items() if k not in ignored},
        {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in ignored},
    )
    differences += [f"trainer.{change}" for change in resume_differences(saved, training_config.to_dict())]
    if differences and not cfg.get("allow_config_change"):
        original = " ".join(saved["extra"].get("overrides", [])) or "(none)"
        may_change = ", ".join(f"trainer.{name}" for name in sorted(RESUMABLE_CHANGES - {"extra"}))
        raise CLIError(
            f"Cannot resume from {str(path)!r}: the config differs from the saved run at "
            + "; ".join(differences)
            + f". Resume with the original overrides ({original}) plus ckpt_path=...; only {may_change} and "
            f"{', '.join(RUN_KEYS)} may change, unless you add allow_config_change=true (the optimizer and "
            "scheduler then continue from the checkpoint's state)."
        )
    if differences:
        log.warning("Resuming %s with a changed config (allow_config_change=true): %s", path, "; ".join(differences))
    return path, state


def _config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved != current:
        return [f"{prefix.rstrip('.')}: checkpoint {saved!r}, now {current!r}"]
    return []


if __name__ == "__main__":
    main()
