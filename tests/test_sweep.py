"""`fedeeg sweep`: grid parsing, cells, resuming after an interruption; `simulate --scenario` overrides (issue 7)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from typer.testing import CliRunner

from fedeeg.cli import app
from fedeeg.scenarios import Scenario, load_scenario
from fedeeg.sweep import cell_name, expand_grid, parse_grid, plan_sweep, run_sweep

TINY = """[scenario]
name = "tiny"
description = "one synthetic site, centralized, 1-s windows"
[run]
dataset = "synthetic"
sites = 1
mode = "centralized"
strategy = "ffa"
rounds = 3
local_epochs = 1
window_seconds = 1.0
device = "cpu"
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_parse_grid_types_values():
    # Execute
    grid = parse_grid("strategy=ffa,fedit,full lora-rank=1,2,4 seed=0,1 lr=0.01 secure=false dropout=0,0.1")
    # Assert
    assert grid == {"strategy": ["ffa", "fedit", "full"], "lora_rank": [1, 2, 4], "seed": [0, 1], "lr": [0.01],
                    "secure": [False], "dropout": [0.0, 0.1]}
    assert isinstance(grid["lr"][0], float) and isinstance(grid["lora_rank"][0], int)


@pytest.mark.parametrize("text, match", [
    ("strategy", "must look like key=v1,v2"),
    ("colour=red", "is not a setting"),
    ("seed=0 seed=1", "given twice"),
    ("lora_rank=two", "is not a int"),
    ("seed=1,1", "lists a value twice"),
    ("out=a,b", "cannot vary 'out'"),
    ("", "grid is empty"),
])
def test_parse_grid_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_grid(text)


def test_expand_grid_and_cell_names(tmp_path):
    # Execute
    cells = expand_grid({"strategy": ["ffa", "full"], "seed": [0, 1, 2]})
    planned = plan_sweep(Scenario("s", settings={"sites": 2}), {"strategy": ["ffa", "full"], "seed": [0, 1]}, tmp_path)
    # Assert
    assert len(cells) == 6 and cells[0] == {"strategy": "ffa", "seed": 0} and cells[1] == {"strategy": "ffa", "seed": 1}
    assert cell_name({"strategy": "ffa", "lr": 0.01, "channels": "Fp1,Fp2"}) == "strategy-ffa_lr-0.01_channels-Fp1-Fp2"
    assert [c.out.name for c in planned] == ["strategy-ffa_seed-0", "strategy-ffa_seed-1", "strategy-full_seed-0",
                                             "strategy-full_seed-1"]
    assert planned[0].settings["sites"] == 2 and planned[0].settings["out"] == str(tmp_path / "strategy-ffa_seed-0")


def test_plan_refuses_a_bad_cell_before_running(tmp_path):
    # Prepare: LoRA strategies do not apply to a baseline backbone
    sc = Scenario("s", settings={"backbone": "eegnet"})
    # Assert
    with pytest.raises(ValueError, match="Sweep cell strategy-ffa: .*eegnet"):
        plan_sweep(sc, {"strategy": ["full", "ffa"]}, tmp_path)


def _fake_runner(calls):
    def run(cell):
        calls.append(cell.name)
        cell.out.mkdir(parents=True, exist_ok=True)
        (cell.out / "summary.json").write_text(json.dumps({"cell": cell.name}))
        return 0
    return run


def test_resume_skips_finished_cells_after_an_interruption(tmp_path):
    # Prepare
    cells = plan_sweep(None, parse_grid("seed=0,1,2"), tmp_path)
    calls: list[str] = []

    def stop_after_first(cell, status, seconds):
        if status == "ran":
            raise KeyboardInterrupt  # the sweep is killed after its first cell

    # Execute
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, runner=_fake_runner(calls), on_cell=stop_after_first)
    first = cells[0].summary.stat().st_mtime_ns
    report = run_sweep(plan_sweep(None, parse_grid("seed=0,1,2"), tmp_path), runner=_fake_runner(calls))
    # Assert
    assert calls == ["seed-0", "seed-1", "seed-2"]  # seed-0 ran once
    assert report.skipped == ["seed-0"] and report.ran == ["seed-1", "seed-2"]
    assert cells[0].summary.stat().st_mtime_ns == first
    log = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [(e["cell"], e["status"]) for e in log] == [("seed-0", "ran"), ("seed-0", "skipped"), ("seed-1", "ran"),
                                                       ("seed-2", "ran")]


def test_a_failed_cell_is_reported_and_rerun_next_time(tmp_path):
    # Prepare
    cells = plan_sweep(None, parse_grid("seed=0,1"), tmp_path)
    calls: list[str] = []
    ok = _fake_runner(calls)
    # Execute
    first = run_sweep(cells, runner=lambda c: 3 if c.name == "seed-0" else ok(c))
    second = run_sweep(cells, runner=ok)
    # Assert
    assert first.failed == ["seed-0"] and first.ran == ["seed-1"]
    assert second.ran == ["seed-0"] and second.skipped == ["seed-1"]


def test_real_tiny_grid_resumes_in_process(tiny, tmp_path):
    # Prepare: two real 1-round runs (centralized, one synthetic site, 1-s windows)
    sc = load_scenario(tiny)
    runs = tmp_path / "runs"

    def stop_after_first(cell, status, seconds):
        if status == "ran":
            raise KeyboardInterrupt

    # Execute
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_sweep(sc, parse_grid("rounds=1 seed=0,1"), runs), scenario=sc, runner="inprocess",
                  on_cell=stop_after_first)
    first = runs / "rounds-1_seed-0" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert not (runs / "rounds-1_seed-1" / "summary.json").exists()
    report = run_sweep(plan_sweep(sc, parse_grid("rounds=1 seed=0,1"), runs), scenario=sc, runner="inprocess")
    # Assert
    assert report.skipped == ["rounds-1_seed-0"] and report.ran == ["rounds-1_seed-1"]
    assert first.stat().st_mtime_ns == stamp
    second = json.loads((runs / "rounds-1_seed-1" / "summary.json").read_text())
    assert second["rounds"] == 1 and second["seed"] == 1 and second["mode"] == "centralized"
    # the cell's scenario file reproduces it
    cell = load_scenario(runs / "rounds-1_seed-1" / "scenario.toml")
    assert cell.settings["rounds"] == 1 and cell.settings["seed"] == 1 and cell.settings["window_seconds"] == 1.0


def test_simulate_scenario_explicit_options_override(tiny, tmp_path):
    # Execute: the scenario says rounds=3; --rounds 1 wins, mode comes from the scenario
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", "--scenario", str(tiny), "--rounds", "1", "--seed", "2", "--out", str(out)])
    # Assert
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rounds"], summary["seed"], summary["mode"], summary["config"]["window_seconds"]) == (1, 2, "centralized", 1.0)


def test_sweep_cli_dry_run_lists_cells(tiny, tmp_path):
    # Prepare
    runs = tmp_path / "runs"
    (runs / "seed-0").mkdir(parents=True)
    (runs / "seed-0" / "summary.json").write_text("{}")
    # Execute
    res = CliRunner().invoke(app, ["sweep", "--scenario", str(tiny), "--grid", "seed=0,1", "--runs", str(runs), "--dry-run"])
    # Assert
    assert res.exit_code == 0, res.output
    assert "1 finished before, 1 to run" in " ".join(res.output.split())
    assert "done  seed-0" in res.output and "todo  seed-1" in res.output
    bad = CliRunner().invoke(app, ["sweep", "--grid", "colour=red", "--runs", str(runs)])
    assert bad.exit_code == 2 and "is not a setting" in bad.output


@pytest.mark.slow
def test_subprocess_sweep_killed_mid_grid_resumes(tiny, tmp_path):
    # Prepare
    import signal
    import subprocess
    import time

    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedeeg.cli", "sweep", "--scenario", str(tiny), "--runs", str(runs),
           "--grid", "rounds=1 seed=0,1"]
    first = runs / "rounds-1_seed-0" / "summary.json"
    # Execute: kill the sweep (and its running cell) as soon as the first cell has finished
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    killed_second = not (runs / "rounds-1_seed-1" / "summary.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # Assert
    assert killed_second
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ran 1, skipped 1 (finished before), failed 0" in " ".join(again.stderr.split())
    assert first.stat().st_mtime_ns == stamp
    assert json.loads((runs / "rounds-1_seed-1" / "summary.json").read_text())["seed"] == 1


def test_engine_option_is_validated_and_passed_on_to_the_cells(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv("FEDEEG_ENGINE", raising=False)
    # Execute
    bad = CliRunner().invoke(app, ["simulate", "--engine", "threads", "--out", str(tmp_path / "x")])
    ok = CliRunner().invoke(app, ["sweep", "--grid", "seed=0,1", "--runs", str(tmp_path / "runs"), "--dry-run",
                                  "--engine", "inprocess"])
    # Assert
    assert bad.exit_code == 2 and "--engine" in bad.output and "'inprocess'" in bad.output
    assert ok.exit_code == 0 and os.environ["FEDEEG_ENGINE"] == "inprocess"
    monkeypatch.delenv("FEDEEG_ENGINE")


def test_simulate_options_given_count_even_where_click_reports_every_source_as_default(monkeypatch):
    # Prepare: a click/typer pair whose parameter sources all read DEFAULT (seen on the GPU host)
    import click
    from click.core import ParameterSource
    from typer.testing import CliRunner

    import fedeeg.cli as cli

    seen = []
    monkeypatch.setattr(click.Context, "get_parameter_source", lambda self, name: ParameterSource.DEFAULT)
    monkeypatch.setattr(cli, "_simulate_scenario", lambda ctx, name, verbose, debug: seen.append(cli._explicit_options(ctx)))
    # Execute
    CliRunner().invoke(cli.app, ["simulate", "--scenario", "x", "--out", "cell-dir", "--rounds", "4"])
    CliRunner().invoke(cli.app, ["simulate", "--scenario", "x"])
    # Assert: the options given override the scenario; the others (lists included) are left to it
    assert seen == [{"out": "cell-dir", "rounds": 4}, {}]
