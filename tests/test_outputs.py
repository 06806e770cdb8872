"""Run outputs: summary.json, metrics.jsonl, the adapter folder, and `fedeeg evaluate` on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedeeg.config import RunConfig
from fedeeg.experiment import prepare_sites, run_centralized, run_local
from fedeeg.outputs import write_outputs

TINY = dict(backbone="labram-small", sites=2, rounds=2, local_epochs=1, batch_size=16, window_seconds=2.0, device="cpu")


@pytest.fixture(scope="module")
def centralized_run(tmp_path_factory):
    cfg = RunConfig(mode="centralized", strategy="ffa", out=str(tmp_path_factory.mktemp("run")), **TINY)
    result = run_centralized(cfg, prepare_sites(cfg))
    out = write_outputs(cfg, result, wall_seconds=1.5)
    return cfg, result, out


def test_summary_has_the_documented_fields(centralized_run):
    cfg, result, out = centralized_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "strategy", "rounds", "seed", "test", "per_site", "communication",
                "trainable_parameters", "total_parameters", "wall_seconds"):
        assert key in summary, key
    assert set(summary["test"]) >= {"balanced_accuracy", "cohen_kappa", "macro_f1", "auroc"}
    assert set(summary["per_site"]) == {"site-0", "site-1"}
    assert set(summary["communication"]) == {"bytes_up_per_site_per_round", "bytes_down_per_site_per_round"}
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert (out / "learning_curve.png").stat().st_size > 1000


def test_adapter_folder_is_peft_format_with_manifest(centralized_run):
    cfg, result, out = centralized_run
    adapter = out / "adapter"
    manifest = json.loads((adapter / "fedeeg_manifest.json").read_text())
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    for key in ("backbone", "channels", "sfreq", "window_seconds", "label_names", "preprocessing", "round",
                "fedeeg_version", "files", "lora"):
        assert key in manifest, key
    assert manifest["channels"] == list(result.channels) and manifest["sfreq"] == 200.0
    assert set(manifest["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "backbone.safetensors"}


def test_reloaded_adapter_predicts_like_the_trained_model(centralized_run):
    # Prepare
    from fedeeg.checkpoint import load_model_dir
    from fedeeg.training import predict_proba

    cfg, result, out = centralized_run
    windows = prepare_sites(cfg)[0].test
    # Execute
    model, _ = load_model_dir(out / "adapter")
    # Assert
    np.testing.assert_allclose(predict_proba(model, windows, device="cpu"),
                               predict_proba(result.models["global"], windows, device="cpu"), atol=1e-5)


def test_tampered_adapter_is_refused(centralized_run, tmp_path):
    import shutil

    from fedeeg.checkpoint import load_model_dir

    _, _, out = centralized_run
    copy = tmp_path / "adapter"
    shutil.copytree(out / "adapter", copy)
    data = bytearray((copy / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not match its sha256"):
        load_model_dir(copy)
    with pytest.raises(FileNotFoundError, match="not a FedEEG model folder"):
        load_model_dir(tmp_path)


def test_evaluate_cli_prints_only_json(centralized_run):
    # Prepare
    from typer.testing import CliRunner

    from fedeeg.cli import app

    _, _, out = centralized_run
    # Execute
    res = CliRunner().invoke(app, ["evaluate", "--adapter", str(out / "adapter"), "--dataset", "synthetic",
                                   "--sites", "2", "--json"])
    # Assert
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert set(payload) >= {"balanced_accuracy", "cohen_kappa", "macro_f1", "auroc", "n_windows", "per_site"}
    assert 0.0 <= payload["balanced_accuracy"] <= 1.0


def test_cli_bad_option_is_one_clear_line():
    from typer.testing import CliRunner

    from fedeeg.cli import app

    res = CliRunner().invoke(app, ["simulate", "--strategy", "fedavg"])
    assert res.exit_code == 2
    assert "Invalid value for the 'strategy' parameter" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["simulate", "--dataset", "eegmat"])
    assert res.exit_code == 2 and "--data-dir" in res.output


def test_local_mode_writes_one_adapter_per_site(tmp_path):
    cfg = RunConfig(mode="local", strategy="fedit", out=str(tmp_path), **{**TINY, "rounds": 1})
    result = run_local(cfg, prepare_sites(cfg))
    out = write_outputs(cfg, result, wall_seconds=1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "local" and "per_site_mean" in summary
    assert (out / "adapters" / "site-0" / "adapter_model.safetensors").is_file()
    assert (out / "adapters" / "site-1" / "fedeeg_manifest.json").is_file()


def test_full_strategy_saves_all_weights(tmp_path):
    from fedeeg.checkpoint import load_model_dir

    cfg = RunConfig(mode="centralized", strategy="full", out=str(tmp_path), **{**TINY, "rounds": 1})
    result = run_centralized(cfg, prepare_sites(cfg))
    out = write_outputs(cfg, result, wall_seconds=1.0)
    assert (out / "adapter" / "model.safetensors").is_file()
    model, manifest = load_model_dir(out / "adapter")
    assert manifest["kind"] == "full" and manifest["lora"] is None
