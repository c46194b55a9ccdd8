"""Every option of every config group composes, and its objects instantiate and fit together."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mlff_distiller.train  # noqa: F401  (registers the trainer schema)
from mlff_distiller.training import ConfigError, Trainer, TrainingConfig
from mlff_distiller.training.optim import build_scheduler, optimizer_factory, scheduler_factory

CONF = files("mlff_distiller.conf")
GROUPS = ("model", "data", "loss", "optimizer", "scheduler", "trainer", "logger", "experiment", "teacher")


def options(group: str) -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def compose_cfg(tmp_path: Path, *overrides: str, experiment: str = "smoke"):
    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", f"experiment={experiment}", *overrides])


# Options that belong to the distillation path are tried at its reduced size (EMT stands in for the teacher).
DISTILL_SMOKE = {
    ("data", "distill"),
    ("data", "distill_water"),
    ("loss", "energy_force_hessian"),
    ("experiment", "distill_smoke"),
}


@pytest.fixture(scope="module")
def smoke_file(tmp_path_factory) -> Path:
    """The smoke dataset as a plain extxyz file, for data=file."""
    from mlff_distiller.teachers.generate import build_default_dataset

    return build_default_dataset(num_structures=48, seed=0, progress=False)


def test_required_groups_and_options_exist():
    assert {"adam", "adamw", "sgd"} <= set(options("optimizer"))
    assert {"cosine", "step", "plateau", "none"} <= set(options("scheduler"))
    assert {"tensorboard", "none"} <= set(options("logger"))
    assert "smoke" in options("experiment")
    for group in GROUPS:
        assert options(group), f"group {group} has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(tmp_path, smoke_file, group, option):
    extra = (
        [f"data.path={smoke_file}", "data.num_val=8", "data.num_test=8"] if (group, option) == ("data", "file") else []
    )
    if group == "experiment" and option.startswith("distill_") and option != "distill_smoke":
        check_distill_experiment(compose_cfg(tmp_path, experiment=option))
        return
    if (group, option) == ("data", "distill_water"):
        # Its own cache directory: the shared one is expected to hold only the distill_smoke set.
        extra = [f"data.source.cache_dir={tmp_path / 'cache'}"]
    if (group, option) in DISTILL_SMOKE:
        cfg = compose_cfg(tmp_path, f"{group}={option}", *extra, experiment="distill_smoke")
    else:
        cfg = compose_cfg(tmp_path, f"{group}={option}", *extra)
    training_config = OmegaConf.to_object(cfg.trainer)
    assert isinstance(training_config, TrainingConfig)
    if group == "teacher":
        check_teacher(cfg)
        return
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, statistics=data.statistics)
    loss = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.trainer.learning_rate)
    factory = instantiate(cfg.scheduler) if "_target_" in (cfg.scheduler or {}) else None
    scheduler = build_scheduler(factory, optimizer, training_config.max_epochs) if factory is not None else None
    loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    batch = next(iter(data.train_loader()))
    terms = loss(model, batch)
    assert torch.isfinite(terms["loss"])
    assert terms["loss"].requires_grad
    if scheduler is not None:
        assert hasattr(scheduler, "step")
    for logger in loggers:
        assert Path(logger.log_dir).is_relative_to(tmp_path)


def check_distill_experiment(cfg) -> None:
    """A foundation-model distillation recipe: composed, its loop, report and model built and checked; its data
    (minutes of teacher labelling) is built by the distill_smoke stand-in instead. The stability gate keeps the
    issue's numbers: NVT >= 20 ps at 1.5x the highest target temperature in >= 108 atoms, then NVE >= 10 ps."""
    from mlff_distiller.distill.compose import loop_settings
    from mlff_distiller.distill.report import ReportConfig

    assert cfg.teacher.name in ("chgnet", "sevenn")
    source = instantiate(cfg.data.source)
    assert type(source).__name__ == "SamplingConfig" and source.teacher == cfg.teacher.name
    assert source.system in ("CuAu", "water")
    loop, committee = loop_settings(cfg)
    assert committee._target_.endswith(".SchNet")  # the recipes' committees stay cheap whatever the final model
    assert loop.rounds >= 1 and loop.committee >= 2 and loop.selection == "committee" and loop.teacher_budget
    report = ReportConfig.from_dict(OmegaConf.to_container(cfg.distill_report, resolve=True))
    gate = report.gate
    assert gate.nvt_ps >= 20 and gate.nve_ps >= 10 and gate.min_atoms >= 108 and gate.temperature_factor == 1.5
    assert report.fresh_frames > 0 and report.observables is not None
    assert instantiate(cfg.model).compute_stress is True
    OmegaConf.to_object(cfg.trainer)
    check_teacher(cfg)


def check_teacher(cfg) -> None:
    """A teacher option builds its calculator, or says how to install it."""
    from mlff_distiller.teachers.calculators import TeacherUnavailableError, make_calculator, teacher_available

    if teacher_available(cfg.teacher.name) and cfg.teacher.name != "mace_mp":
        assert hasattr(make_calculator(cfg.teacher.name, **cfg.teacher.kwargs), "get_potential_energy")
    elif not teacher_available(cfg.teacher.name):
        with pytest.raises(TeacherUnavailableError, match="pip install"):
            make_calculator(cfg.teacher.name, **cfg.teacher.kwargs)


@pytest.mark.parametrize(
    "group,option", [("optimizer", o) for o in options("optimizer")] + [("scheduler", o) for o in options("scheduler")]
)
def test_cli_groups_are_the_python_api_names(tmp_path, group, option):
    """One path: each optimizer/scheduler option builds exactly the partial that the same name gives through
    TrainingConfig (same class, same arguments, values read from trainer.*), with non-default values."""
    values = [
        "trainer.learning_rate=0.0123",
        "trainer.weight_decay=0.01",
        "trainer.momentum=0.7",
        "trainer.nesterov=true",
        "trainer.min_lr=1e-4",
        "trainer.step_size=3",
        "trainer.gamma=0.3",
        "trainer.plateau_factor=0.25",
        "trainer.plateau_patience=2",
        "trainer.early_stopping_min_delta=0.01",
        "mode=max",
    ]
    cfg = compose_cfg(tmp_path, f"{group}={option}", *values)
    config = OmegaConf.to_object(cfg.trainer)
    node = cfg[group]
    from_cli = instantiate(node) if "_target_" in (node or {}) else None
    if group == "optimizer":
        from_api = optimizer_factory(TrainingConfig(**{**config.to_dict(), "optimizer": option}))
    else:
        from_api = scheduler_factory(TrainingConfig(**{**config.to_dict(), "lr_scheduler": option}))
    if from_api is None:
        assert from_cli is None
        return
    assert from_cli.func is from_api.func
    assert from_cli.keywords == from_api.keywords


def test_shared_values_are_interpolated_once(tmp_path):
    cfg = compose_cfg(tmp_path, "monitor=val/force_mae", "mode=max", "cutoff=3.5", "scheduler=plateau")
    assert cfg.trainer.monitor == "val/force_mae"
    assert cfg.trainer.mode == "max" and cfg.scheduler.mode == "max"
    assert cfg.model.cutoff == cfg.data.cutoff == 3.5
    assert cfg.optimizer.lr == cfg.trainer.learning_rate
    assert cfg.data.batch_size == cfg.trainer.batch_size == 8  # from experiment=smoke
    assert cfg.data.source.seed == cfg.seed


def test_smoke_experiment_overrides_defaults(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.trainer.max_epochs == 2
    assert cfg.data.source.num_structures == 48


def test_invalid_value_is_a_config_error(tmp_path):
    cfg = compose_cfg(tmp_path, "trainer.learning_rate=-0.1")
    with pytest.raises(ConfigError, match=r"learning_rate=-0.1.*> 0"):
        OmegaConf.to_object(cfg.trainer)


def _loop_of(cfg):
    """The ActiveLoop that mlff-train would build for ``cfg`` (its run patched out: nothing is sampled)."""
    from unittest import mock

    from mlff_distiller.distill import compose as distill_compose
    from mlff_distiller.distill.loop import ActiveLoop
    from mlff_distiller.train import _training_config

    built = []

    def capture(loop):
        built.append(loop)
        raise KeyboardInterrupt  # stop before any work

    with mock.patch.object(ActiveLoop, "run", capture), pytest.raises(KeyboardInterrupt):
        distill_compose.active_loop(cfg, _training_config(cfg))
    return built[0]


@pytest.mark.parametrize("experiment", ["distill_chgnet", "distill_sevenn_water"])
def test_the_recipes_committee_is_schnet_whatever_the_final_model(tmp_path, experiment):
    from mlff_distiller.data.statistics import DatasetStatistics
    from mlff_distiller.models.painn import PaiNN
    from mlff_distiller.models.schnet import SchNet

    stats = DatasetStatistics(atomic_energies={29: -1.0}, force_rms=1.0, avg_num_neighbors=10.0)
    shipped = _loop_of(compose_cfg(tmp_path, experiment=experiment))
    painn = compose_cfg(tmp_path, "model=painn", experiment=experiment)
    assert painn.model._target_.endswith("PaiNN")
    final_only = _loop_of(painn)
    assert type(final_only.recipe.build_model(stats)) is SchNet
    # The final student's architecture is not part of the rounds: they stay cached.
    assert final_only.state_directory() == shipped.state_directory()
    both = _loop_of(compose_cfg(tmp_path, "model=painn", "model@distill.committee_model=painn", experiment=experiment))
    assert type(both.recipe.build_model(stats)) is PaiNN and both.state_directory() != shipped.state_directory()
    # null: the committee is the recipe's model again, its width included.
    null = compose_cfg(
        tmp_path, "model=painn", "model.hidden=24", "distill.committee_model=null", experiment=experiment
    )
    same = _loop_of(null).recipe.build_model(stats)
    assert type(same) is PaiNN and same.hidden == 24


def test_a_committee_model_without_target_names_the_key(tmp_path):
    from mlff_distiller.cli import CLIError

    cfg = compose_cfg(tmp_path, "distill.committee_model=schnet", experiment="distill_smoke")
    with pytest.raises(CLIError, match=r"distill.committee_model must be a model config .* got 'schnet'"):
        _loop_of(cfg)


def test_composed_job_trains(tmp_path):
    """The smoke composition, wired by hand as train.py does, lowers the validation loss in three epochs."""
    cfg = compose_cfg(tmp_path, "logger=none", "trainer.max_epochs=3")
    torch.manual_seed(0)
    data = instantiate(cfg.data)
    trainer = Trainer(
        model=instantiate(cfg.model),
        train_loader=data.train_loader(),
        val_loader=data.val_loader(),
        config=OmegaConf.to_object(cfg.trainer),
        loss_fn=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.scheduler),
        loggers=[],
    )
    assert trainer.scheduler.T_max == 3  # the cosine spans the run: the Trainer sets its horizon
    history = trainer.fit()
    # The optimised quantity (energy + force + stress terms) falls by a fifth in three short epochs.
    assert history["val/loss"][-1] < 0.8 * history["val/loss"][0]
    assert min(history["val/force_mae"]) < 0.9 * history["val/force_mae"][0]


@pytest.mark.parametrize(
    "override,module",
    [
        ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher"),
    ],
)
def test_cluster_options_compose(tmp_path, override, module):
    """The Optuna search space and the SLURM launcher compose with the plugins they name."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (extras [optuna] / [cluster])")
    with initialize_config_module(config_module="mlff_distiller.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", override], return_hydra_config=True)
    if override.startswith("hparams_search"):
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
        assert set(sweeper.params) == {
            "trainer.learning_rate",
            "model.hidden",
            "loss.energy_weight",
            "loss.force_weight",
        }
        for key in sweeper.params:  # every searched key exists in the composed config
            assert OmegaConf.select(cfg, key) is not None, key
    else:
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.gpus_per_node, launcher.timeout_min, launcher.max_num_timeout) == (1, 240, 5)
