"""The CLI on hospital folders: `fedeeg check`, `simulate --dataset folder`, `evaluate --dataset folder`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from _recordings import CH_NAMES, make_raw, write, write_text_as
from fedeeg.cli import app

SITE = """
[site]
name = "{name}"
[data]
root = "{root}"
format = "edf"
subject_pattern = "(?P<subject>S\\\\d+)"
[labels]
source = "annotations"
mapping = {{ T1 = "left", T2 = "right" }}
"""


def _site(tmp_path, name, n_subjects=3, seed=0):
    root = tmp_path / name
    for i in range(n_subjects):
        write(make_raw(duration=20.0, sfreq=250.0, seed=seed + i), root / f"S{i + 1:02d}.edf")
    toml = tmp_path / f"{name}.toml"
    toml.write_text(SITE.format(name=name, root=root.as_posix()))
    return toml


def test_check_reports_a_usable_site_and_a_bad_file(tmp_path):
    # Prepare: three good recordings and a text file named like an EDF
    toml = _site(tmp_path, "hospital-a")
    write_text_as(tmp_path / "hospital-a" / "S09.edf")
    # Execute
    res = CliRunner().invoke(app, ["check", "--site", str(toml), "--window-seconds", "2"])
    res_json = CliRunner().invoke(app, ["check", "--site", str(toml), "--window-seconds", "2", "--json"])
    # Assert: exit 0 (the site can train), the bad file named with its problem, JSON for machines
    assert res.exit_code == 0, res.output
    assert "S09.edf" in res.output
    assert res_json.stdout.lstrip().startswith("{"), repr(res_json.stdout[:300])
    report = json.loads(res_json.stdout)
    assert report["can_train"] is True
    assert any("S09.edf" in s["file"] for s in report["report"]["skipped"])


def test_check_exits_nonzero_when_the_site_cannot_train(tmp_path):
    # Prepare: only a non-EEG file
    root = tmp_path / "empty-site"
    root.mkdir()
    write_text_as(root / "S01.edf")
    # Execute
    res = CliRunner().invoke(app, ["check", "--data-dir", str(root), "--format", "edf", "--label-map", "T1=left,T2=right",
                                   "--window-seconds", "2"])
    # Assert
    assert res.exit_code == 1, res.output
    assert "S01.edf" in res.output


def test_check_needs_a_site_or_a_folder():
    res = CliRunner().invoke(app, ["check"])
    assert res.exit_code != 0 and "--site SITE.toml or --data-dir" in res.output


@pytest.mark.slow
def test_simulate_and_evaluate_on_folders(tmp_path):
    # Prepare
    a, b = _site(tmp_path, "hospital-a", seed=0), _site(tmp_path, "hospital-b", seed=10)
    out = tmp_path / "run"
    common = ["--site", str(a), "--site", str(b), "--cache-dir", str(tmp_path / "cache")]
    # Execute: a centralized run (no Ray) then evaluation of its adapter on the same folders
    sim = CliRunner().invoke(app, ["simulate", "--dataset", "folder", *common, "--labels", "left,right",
                                   "--channels", ",".join(CH_NAMES), "--window-seconds", "2", "--mode", "centralized",
                                   "--rounds", "1", "--local-epochs", "1", "--device", "cpu", "--out", str(out)])
    ev = CliRunner().invoke(app, ["evaluate", "--adapter", str(out / "adapter"), "--dataset", "folder", *common, "--json"])
    # Assert
    assert sim.exit_code == 0, sim.output
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    assert set(result["per_site"]) == {"hospital-a", "hospital-b"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "folder"
