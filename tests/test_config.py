"""Run config: validation at the edge and the Flower bridge."""

import tomllib
from pathlib import Path

import pytest

from fedeeg.config import RunConfig


def test_pyproject_app_config_matches_runconfig_defaults():
    # Prepare
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    # Execute
    from_flower = RunConfig.from_mapping(app_config)
    # Assert: `flwr run .` and `fedeeg simulate` start from the same defaults
    assert from_flower == RunConfig()
    assert set(app_config) == set(RunConfig().to_flower())


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("strategy", "fedavg", r"'strategy'.*'ffa', 'fedit', 'full'.*'fedavg'"),
        ("mode", "pooled", r"'mode'.*'federated'"),
        ("dataset", "tuh", r"'dataset'.*'synthetic', 'eegmat'"),
        ("rounds", 0, r"'rounds' must be >= 1"),
        ("test_fraction", 1.5, r"'test_fraction' must be <= 0.99"),
        ("window_seconds", 2.5, r"whole number of 1-s patches"),
        ("lora_rank", 2.0, r"'lora_rank' must be int"),
    ],
)
def test_bad_values_name_parameter_and_value(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RunConfig(**{field: value})


def test_eegmat_needs_data_dir():
    with pytest.raises(ValueError, match="--data-dir"):
        RunConfig(dataset="eegmat")


def test_flower_round_trip_and_unknown_keys():
    cfg = RunConfig(strategy="fedit", rounds=3, lr=1e-3)
    assert RunConfig.from_mapping(cfg.to_flower()) == cfg
    assert RunConfig.from_mapping({"lr": 0.0}).lr is None
    with pytest.raises(ValueError, match=r"Unknown run config key\(s\) \['num-rounds'\]"):
        RunConfig.from_mapping({"num-rounds": 3})


def test_effective_learning_rate_per_strategy():
    assert RunConfig(strategy="full").learning_rate == pytest.approx(5e-4)
    assert RunConfig(strategy="ffa").learning_rate == pytest.approx(1e-2)
    assert RunConfig(strategy="fedit").learning_rate == pytest.approx(5e-3)
    assert RunConfig(strategy="ffa", lr=1e-2).learning_rate == pytest.approx(1e-2)
