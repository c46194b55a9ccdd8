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
    print_metrics,
    task_overrides,
    write_json,
)
from mlff_distiller.training.config import ConfigError, TrainingConfig

log = logging.getLogger("mlff_distiller.train")

ConfigStore.instance().store(group="trainer", name="schema", node=TrainingConfig)

# Keys that may differ between a run and its resumption (paths are per run; max_epochs may be raised;
# callbacks observe the run).
RESUME_MAY_CHANGE = ("ckpt_path", "allow_config_change", "auto_resume", "callbacks", "paths", "trainer.max_epochs")
# TrainingConfig fields that only the Python API uses; on the command line the groups decide.
GROUP_OWNED = {"trainer.optimizer": "optimizer", "trainer.lr_scheduler": "scheduler"}


@hydra.main(version_base="1.3", config_path="pkg://mlff_distiller.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train with the composed config; returns the best monitored value (for sweepers such as Optuna)."""
    try:
        result = train(cfg)
        _leave_process_group()
        return result
    except Exception as error:
        from mlff_distiller.training import CheckpointError, NonFiniteLossError, TrainingInterrupted

        if isinstance(error, TrainingInterrupted):
            overrides = " ".join(o for o in task_overrides() if not o.startswith("ckpt_path="))
            log.warning("Resume with: mlff-train %s ckpt_path=%s", overrides, Path(cfg.paths.output_dir))
            raise SystemExit(error.exit_code) from None
        if in_multirun():
            # One failed job (e.g. a trial whose learning rate diverges) must not end a sweep: Hydra
            # records the exception, sweepers such as Optuna count the trial as failed and go on.
            log.error("This job failed (%s: %s); the sweep goes on with the other jobs.", type(error).__name__, error)
            raise
        from mlff_distiller.distill.gate import DistillationFailed
        from mlff_distiller.teachers.calculators import TeacherUnavailableError

        if isinstance(error, DistillationFailed):
            fail("mlff-train", error, EXIT_VERDICT_FAILED)
        known = (CLIError, ConfigError, CheckpointError, NonFiniteLossError, TeacherUnavailableError)
        if isinstance(error, known) or is_instantiation_error(error):
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
    """Compose-then-run body of ``mlff-train``, callable from Python with a composed config."""
    overrides = task_overrides()
    _reject_group_owned_overrides(overrides)
    training_config: TrainingConfig = OmegaConf.to_object(cfg.trainer)  # validates every field

    from hydra.utils import instantiate

    from mlff_distiller.training import ConsoleLogger, Trainer, distributed
    from mlff_distiller.training.trainer import seed_everything

    # Under torchrun: join the process group (gloo on CPU, nccl on GPUs); only rank 0 writes files.
    distributed.init_from_env(training_config.device)
    training_config.device = distributed.local_device(training_config.device)
    main_process = distributed.rank() == 0
    if not main_process:
        _stop_file_logging()
    resume_path, resume_state = _resolve_resume(cfg, training_config.checkpoint_dir)
    if cfg.get("teacher") is not None and cfg.data.get("path") is None:
        from mlff_distiller.teachers.calculators import require_teacher

        require_teacher(cfg.teacher.name)  # a missing teacher package stops the run before any work

    output_dir = Path(cfg.paths.output_dir)
    training_config.extra = {
        "run_config": OmegaConf.to_container(cfg, resolve=False),
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),  # rebuilds the student later
        "overrides": overrides,
    }

    from mlff_distiller.distill.compose import active_loop, check_verdict, final_report

    loop = active_loop(cfg, training_config)  # a distillation recipe's rounds; None without `distill`
    if cfg.seed is not None:
        seed_everything(cfg.seed)  # model initialisation and data generation are reproducible too
    data = instantiate(cfg.data, **({"path": str(loop.dataset)} if loop is not None else {}))
    statistics = getattr(data, "statistics", None)
    model = instantiate(cfg.model, **({"statistics": statistics} if statistics is not None else {}))
    loss = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") and "_target_" in cfg.scheduler else None
    loggers = [ConsoleLogger(print_epochs=False)]
    loggers += [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    callbacks = {name: instantiate(node) for name, node in (cfg.get("callbacks") or {}).items() if node}

    trainer = Trainer(
        model=model,
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=training_config,
        loss_fn=loss,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        loggers=loggers,
        callbacks=callbacks,
    )
    if resume_state is not None:
        trainer.load_state_dict(resume_state, source=str(resume_path), strict_config=not cfg.allow_config_change)
        if main_process:
            _carry_best_checkpoint(resume_path, trainer.checkpoint_dir)
        distributed.barrier()
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


def _stop_file_logging() -> None:
    """Processes other than rank 0 keep their console output but leave the run's log file to rank 0."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _carry_best_checkpoint(resume_path: Path, checkpoint_dir: Path | None) -> None:
    """The resumed run starts in a new directory: bring the best model so far along, so that test
    evaluation and StudentCalculator find it even if no later epoch improves on it."""
    source = resume_path.parent / "best_model.pt"
    if checkpoint_dir is None or not source.is_file() or source.resolve() == (checkpoint_dir / source.name).resolve():
        return
    import shutil

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, checkpoint_dir / source.name)


def _evaluate_test_split(trainer: Any, data: Any, show: bool = True) -> dict[str, float]:
    """Evaluate the best checkpoint (EMA weights when kept) on the test split and print a table."""
    test_loader = data.test_loader() if hasattr(data, "test_loader") else None
    best = trainer.checkpoint_dir / "best_model.pt" if trainer.checkpoint_dir is not None else None
    if test_loader is None or best is None or not best.is_file():
        if test_loader is not None:
            log.warning("No best_model.pt in %s: the test split was not evaluated.", trainer.checkpoint_dir)
        return {}
    from mlff_distiller.training import load_checkpoint_file

    # Only its weights matter here; with allow_config_change the carried-over best model has the old config.
    trainer.load_state_dict(load_checkpoint_file(best), source=str(best), strict_config=False)
    results = trainer.evaluate(test_loader, prefix="test")
    if hasattr(data, "force_std"):
        results["test/force_std"] = 1e3 * data.force_std("test")
    if show:
        title = f"Test split: {len(data.datasets['test'])} structures, best model (epoch {trainer.epoch})"
        print_metrics(results, title)
    return results


def _reject_group_owned_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in GROUP_OWNED:
            group = GROUP_OWNED[key]
            raise CLIError(
                f"'{override}': on the command line the {group} is chosen with the '{group}' group "
                f"(e.g. {group}=adamw); {key} is only read by the Python API."
            )


def _resolve_resume(cfg: DictConfig, checkpoint_dir: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """Find and check the checkpoint named by ``ckpt_path`` (or, with ``auto_resume``, the run's own
    checkpoints, as a requeued cluster job finds them); a resume that cannot be honoured is an error."""
    from mlff_distiller.training.checkpoint import read_checkpoint, resume_candidates

    ckpt_path = cfg.get("ckpt_path")
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
    saved = state.get("config", {}).get("extra", {})
    if "run_config" not in saved:
        raise CLIError(
            f"ckpt_path={str(path)!r} was not written by mlff-train (no run config inside); resume it "
            "from Python with Trainer.load_checkpoint."
        )
    differences = _config_differences(saved["run_config"], OmegaConf.to_container(cfg, resolve=False))
    if differences and not cfg.get("allow_config_change"):
        original = " ".join(saved.get("overrides", [])) or "(none)"
        raise CLIError(
            f"Cannot resume from {str(path)!r}: the config differs from the saved run at "
            + "; ".join(differences)
            + f". Resume with the original overrides ({original}) plus ckpt_path=...; only trainer.max_epochs may "
            "change, unless you add allow_config_change=true (the optimizer and scheduler then continue from "
            "the checkpoint's state)."
        )
    if differences:
        log.warning("Resuming %s with a changed config (allow_config_change=true): %s", path, "; ".join(differences))
    return path, state


def _config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if prefix.rstrip(".") in RESUME_MAY_CHANGE:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved != current:
        return [f"{prefix.rstrip('.')} (saved {saved!r}, now {current!r})"]
    return []


if __name__ == "__main__":
    main()
