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
        ("compile", "max-autotune", r"'compile'.*'off', 'on', 'reduce-overhead'.*'max-autotune'"),
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


@pytest.mark.parametrize(
    "setting, device, want",
    [
        ("off", "cuda", False),
        ("on", "cpu", False),  # CPU sites train eagerly whatever the run says
        ("on", "cuda", True),
        ("reduce-overhead", "cuda:0", "reduce-overhead"),
        ("max-autotune-no-cudagraphs", "cpu", False),
    ],
)
def test_compile_applies_only_to_cuda_training(setting, device, want):
    assert RunConfig(compile=setting).compile_for(device) == want


def test_training_gets_the_compile_setting(monkeypatch):
    # Prepare: a centralized run on the CPU with compile on; record what train_epochs is asked
    import fedeeg.experiment as experiment
    from fedeeg.experiment import prepare_sites, run_centralized

    seen, asked = [], []
    train = experiment.train_epochs
    monkeypatch.setattr(experiment, "train_epochs", lambda *a, **kw: seen.append(kw["compile"]) or train(*a, **kw))
    monkeypatch.setattr(RunConfig, "compile_for", lambda self, device: asked.append((self.compile, str(device))) or False)
    cfg = RunConfig(mode="centralized", rounds=2, local_epochs=1, synth_subjects=2, synth_windows_per_class=2,
                    device="cpu", compile="on")
    # Execute
    run_centralized(cfg, prepare_sites(cfg))
    # Assert: each round's training asked the run config for the device it trains on
    assert asked == [("on", "cpu")] * 2
    assert seen == [False, False]
