"""TrainingConfig: value validation, from_dict, and use as a Hydra structured config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from trainer_testkit import linear_model, loader, regression_data

from mlff_distiller.training import ConfigError, Trainer, TrainingConfig

# (field, bad value, fragment of the accepted values that the message must show)
INVALID = [
    ("learning_rate", -1e-3, "a finite number > 0"),
    ("learning_rate", 0.0, "a finite number > 0"),
    ("learning_rate", math.nan, "a finite number > 0"),
    ("learning_rate", "fast", "a finite number > 0"),
    ("optimizer", "rmsprop", "one of 'adam', 'adamw', 'sgd'"),
    ("lr_scheduler", "exponential", "one of 'cosine', 'step', 'plateau', 'none'"),
    ("scheduler_interval", "batch", "one of 'epoch', 'step'"),
    ("mixed_precision", "fp8", "one of 'off', 'bf16', 'fp16'"),
    ("mode", "minimum", "one of 'min', 'max'"),
    ("early_stopping_patience", -1, "an integer >= 0 or None"),
    ("early_stopping_patience", 1.5, "an integer >= 0 or None"),
    ("gamma", 0.0, "a number in (0, 1)"),
    ("gamma", 1.0, "a number in (0, 1)"),
    ("gamma", 1.5, "a number in (0, 1)"),
    ("plateau_factor", 1.0, "a number in (0, 1)"),
    ("gradient_accumulation_steps", 0, "an integer >= 1"),
    ("max_epochs", 0, "an integer >= 1"),
    ("max_epochs", 2.5, "an integer >= 1"),
    ("max_epochs", True, "an integer >= 1"),
    ("batch_size", -4, "an integer >= 1"),
    ("log_interval", 0, "an integer >= 1"),
    ("val_interval", 0, "an integer >= 1"),
    ("step_size", 0, "an integer >= 1"),
    ("max_nonfinite_steps", 0, "an integer >= 1"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("plateau_patience", -2, "an integer >= 0"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("momentum", -0.5, "a finite number >= 0"),
    ("min_lr", -1e-6, "a finite number >= 0"),
    ("min_lr", 0.5, "<= learning_rate (0.001)"),
    ("early_stopping_min_delta", -0.1, "a finite number >= 0"),
    ("grad_clip", 0.0, "a number > 0 or None"),
    ("grad_clip_value", -1.0, "a number > 0 or None"),
    ("ema_decay", 1.0, "a number in (0, 1) or None"),
    ("ema_decay", 0.0, "a number in (0, 1) or None"),
    ("monitor", "loss", "a metric name with a split prefix"),
    ("seed", 1.5, "an integer or None"),
    ("device", "tpu", "one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("device", "cuda:x", "one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
]


@pytest.mark.parametrize(("field", "value", "accepted"), INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_value_raises_config_error_naming_field_value_and_accepted(field, value, accepted):
    """Each invalid value raises ConfigError whose message names the field, the value and what is accepted."""
    with pytest.raises(ConfigError) as info:
        TrainingConfig(**{field: value})
    message = str(info.value)
    assert f"{field}={value!r}" in message
    assert accepted in message


def test_config_error_is_a_value_error():
    """ConfigError can be caught as ValueError (what OmegaConf/Hydra users expect)."""
    assert issubclass(ConfigError, ValueError)


def test_fp16_with_cpu_device_in_config_is_rejected():
    """fp16 needs CUDA: a config that pins device='cpu' with fp16 is rejected and offers 'off'/'bf16'."""
    with pytest.raises(ConfigError) as info:
        TrainingConfig(mixed_precision="fp16", device="cpu")
    message = str(info.value)
    assert "mixed_precision='fp16'" in message
    assert "'off' or 'bf16'" in message


def test_nesterov_needs_momentum_for_sgd():
    """SGD with nesterov=True and momentum=0 is refused; with momentum it is accepted."""
    with pytest.raises(ConfigError, match=r"nesterov=True .*False when momentum is 0"):
        TrainingConfig(optimizer="sgd", nesterov=True, momentum=0.0)
    assert TrainingConfig(optimizer="sgd", nesterov=True, momentum=0.9).nesterov is True


def test_valid_edge_values_are_accepted():
    """Boundary values that are valid do not raise."""
    config = TrainingConfig(
        warmup_steps=0,
        plateau_patience=0,
        early_stopping_patience=0,
        min_lr=1e-3,
        learning_rate=1e-3,
        monitor="lr",
        device="cuda:3",
        seed=None,
        ema_decay=0.999,
    )
    assert (config.min_lr, config.device, config.seed) == (1e-3, "cuda:3", None)


def test_trainer_rejects_fp16_on_cpu_at_construction():
    """Trainer(config with fp16, device='cpu') raises ConfigError before any training happens."""
    x, y = regression_data(n=8)
    config = TrainingConfig(mixed_precision="fp16", checkpoint_dir=None)  # device='auto' is accepted here
    with pytest.raises(ConfigError) as info:
        Trainer(linear_model(), loader(x, y), config=config, device="cpu", loggers=[])
    message = str(info.value)
    assert "mixed_precision='fp16'" in message
    assert "'cpu'" in message
    assert "'off' or 'bf16'" in message


def test_trainer_rejects_unknown_device():
    """An unknown device string given to the Trainer raises ConfigError listing the accepted devices."""
    x, y = regression_data(n=8)
    with pytest.raises(ConfigError, match=r"'auto', 'cpu', 'cuda', 'cuda:N'"):
        Trainer(linear_model(), loader(x, y), config=TrainingConfig(checkpoint_dir=None), device="npu", loggers=[])


def test_from_dict_rejects_unknown_keys_and_lists_accepted_fields():
    """from_dict names the unknown key(s) and lists every accepted field."""
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict({"learning_rate": 0.1, "lr": 0.1, "epochs": 3})
    message = str(info.value)
    assert "['epochs', 'lr']" in message
    for field in dataclasses.fields(TrainingConfig):
        assert repr(field.name) in message


def test_from_dict_round_trips_to_dict():
    """from_dict(to_dict()) rebuilds an equal config; a mapping passed to the Trainer is accepted too."""
    config = TrainingConfig(
        learning_rate=0.02, optimizer="sgd", lr_scheduler="step", step_size=3, extra={"run": "a"}, checkpoint_dir=None
    )
    assert TrainingConfig.from_dict(config.to_dict()) == config
    x, y = regression_data(n=8)
    trainer = Trainer(linear_model(), loader(x, y), config=config.to_dict(), device="cpu", loggers=[])
    assert trainer.config == config
    with pytest.raises(ConfigError, match="Unknown TrainingConfig field"):
        Trainer(linear_model(), loader(x, y), config={"learningrate": 0.1}, device="cpu", loggers=[])


def test_trainer_rejects_non_config_object():
    """A config that is neither a TrainingConfig nor a mapping is rejected with its type name."""
    x, y = regression_data(n=8)
    with pytest.raises(ConfigError, match="not list"):
        Trainer(linear_model(), loader(x, y), config=[1, 2], device="cpu", loggers=[])


# ------------------------------------------------------------------------- Hydra / OmegaConf
def test_omegaconf_structured_merge_and_to_object():
    """OmegaConf.structured(TrainingConfig) + an override merges and converts back to a TrainingConfig."""
    schema = OmegaConf.structured(TrainingConfig)
    merged = OmegaConf.merge(
        schema,
        {
            "learning_rate": 0.01,
            "lr_scheduler": "cosine",
            "grad_clip": 2.0,
            "early_stopping_patience": 5,
            "extra": {"tag": "x"},
        },
    )
    config = OmegaConf.to_object(merged)
    assert isinstance(config, TrainingConfig)
    assert (config.learning_rate, config.lr_scheduler, config.grad_clip) == (0.01, "cosine", 2.0)
    assert config.early_stopping_patience == 5
    assert config.extra == {"tag": "x"}
    assert config.max_epochs == TrainingConfig().max_epochs  # untouched defaults survive


def test_omegaconf_rejects_type_errors():
    """A value of the wrong type (max_epochs='abc') is refused by OmegaConf's schema check."""
    schema = OmegaConf.structured(TrainingConfig)
    with pytest.raises(ValidationError, match="max_epochs"):
        OmegaConf.merge(schema, {"max_epochs": "abc"})
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"grad_clip": "big"})


def test_omegaconf_to_object_runs_value_validation():
    """Type-correct but invalid values are caught by __post_init__ when the object is built."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainingConfig), {"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="optimizer='rmsprop'"):
        OmegaConf.to_object(merged)


def test_hydra_compose_with_command_line_overrides():
    """Registered in Hydra's ConfigStore, the schema composes with CLI-style overrides."""
    ConfigStore.instance().store(name="_test_training_config", node=TrainingConfig)
    with initialize(version_base=None, config_path=None):
        cfg = compose("_test_training_config", overrides=["learning_rate=0.01", "optimizer=sgd", "grad_clip=1.5"])
        config = OmegaConf.to_object(cfg)
        assert isinstance(config, TrainingConfig)
        assert (config.learning_rate, config.optimizer, config.grad_clip) == (0.01, "sgd", 1.5)
        with pytest.raises(ConfigCompositionException):
            compose("_test_training_config", overrides=["max_epochs=abc"])


def test_optimizer_and_scheduler_none_mean_given_to_the_trainer():
    """optimizer=None / lr_scheduler=None are valid (the Trainer receives them); a Trainer given no
    optimizer then fails with a ConfigError saying what to do, and lr_scheduler=None means no scheduler."""
    config = TrainingConfig(optimizer=None, lr_scheduler=None, checkpoint_dir=None, batch_size=8, max_epochs=3)
    x, y = regression_data(n=16)
    with pytest.raises(ConfigError, match=r"optimizer=None .*pass optimizer=\.\.\. .*'adam', 'adamw', 'sgd'"):
        Trainer(linear_model(), loader(x, y), config=config, device="cpu", loggers=[])
    model = linear_model()
    trainer = Trainer(
        model,
        loader(x, y),
        config=config,
        device="cpu",
        loggers=[],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.125),
    )
    assert trainer.scheduler is None
    assert trainer.fit()["lr"] == [0.125] * config.max_epochs
    with pytest.raises(ConfigError, match=r"optimizer='rmsprop' .*'sgd' or None \(given to the Trainer\)"):
        TrainingConfig(optimizer="rmsprop")
