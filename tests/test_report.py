"""`fedeeg report`: the Markdown table against the runs' summaries, and the plots (issue 7)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from fedeeg.cli import app
from fedeeg.config import RunConfig
from fedeeg.report import group_runs, load_runs, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, *, strategy, rank, seed, bal, sites, up, rounds=3, mode="federated"):
    """A run folder as `fedeeg simulate` writes it (the parts the report reads)."""
    cfg = RunConfig(strategy=strategy, lora_rank=rank, seed=seed, rounds=rounds, mode=mode, out=str(folder)).to_dict()
    summary = {
        "mode": mode, "strategy": strategy, "rounds": rounds, "seed": seed, "dataset": "synthetic",
        "test": {"balanced_accuracy": bal, "cohen_kappa": 2 * bal - 1, "macro_f1": bal - 0.01, "auroc": None,
                 "n_windows": 80},
        "per_site": {name: {"balanced_accuracy": v, "cohen_kappa": 0.0, "macro_f1": v, "auroc": 0.5, "n_windows": 40}
                     for name, v in sites.items()},
        "communication": {"bytes_up_per_site_per_round": up, "bytes_down_per_site_per_round": up},
        "trainable_parameters": 1000 * rank, "total_parameters": 500_000, "wall_seconds": 10.0 + seed,
        "config": cfg,
    }
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    lines = [{"round": r, "train_loss": 0.7, "test": {"balanced_accuracy": bal * r / rounds}, "per_site": {}}
             for r in range(1, rounds + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def runs_dir(tmp_path):
    # Prepare: 2 strategies x 2 ranks x 3 seeds (one cell with 2 seeds), known numbers
    rng = np.random.default_rng(0)
    truth = {}
    for strategy, up in (("ffa", 30_000), ("fedit", 50_000)):
        for rank in (2, 4):
            seeds = (0, 1) if (strategy, rank) == ("fedit", 4) else (0, 1, 2)
            for seed in seeds:
                bal = float(np.round(rng.uniform(0.5, 0.9), 4))
                sites = {"site-0": float(np.round(rng.uniform(0.4, 1.0), 4)), "site-1": float(np.round(rng.uniform(0.4, 1.0), 4))}
                _write_run(tmp_path / "runs" / f"{strategy}-r{rank}-s{seed}", strategy=strategy, rank=rank, seed=seed,
                           bal=bal, sites=sites, up=up * rank)
                truth.setdefault((strategy, rank), []).append((bal, np.mean(list(sites.values()))))
    return tmp_path / "runs", truth


def _table_rows(text):
    rows = {}
    for line in text.splitlines():
        if line.startswith("| strategy="):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_matches_the_summaries(runs_dir):
    # Prepare
    runs, truth = runs_dir
    # Execute
    out = write_report(runs, plots=False)
    rows = _table_rows((out / "report.md").read_text())
    # Assert: every group, its seed count, mean ± sd (ddof=1) in percent, bytes
    assert len(rows) == 4
    for (strategy, rank), values in truth.items():
        row = rows[f"strategy={strategy}, lora_rank={rank}"]
        bal = np.array([v[0] for v in values])
        site = np.array([v[1] for v in values])
        assert row[0] == f"{100 * bal.mean():.1f} ± {100 * bal.std(ddof=1):.1f}"
        assert row[1] == f"{100 * site.mean():.1f} ± {100 * site.std(ddof=1):.1f}"
        assert row[2] == str(len(values))
        assert row[3] == f"{(2 * bal - 1).mean():.3f}"  # kappa
        assert row[5] == "—"  # AUROC was null (NaN) in every run
        up = (30_000 if strategy == "ffa" else 50_000) * rank
        assert row[7] == f"{up:,}" and row[8] == f"{3 * up:,}"
    data = json.loads((out / "report.json").read_text())
    assert data["varying"] == ["strategy", "lora_rank"]


def test_plots_are_written(runs_dir):
    # Execute
    out = write_report(runs_dir[0], runs_dir[0].parent / "rep")
    # Assert
    for name in ("learning_curves.png", "accuracy_vs_rank.png", "accuracy_vs_bytes.png", "per_site.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_report_folder_inside_runs_is_not_read_as_runs(runs_dir):
    # Prepare
    runs, _ = runs_dir
    write_report(runs, plots=False)
    (runs / "report" / "summary.json").write_text("{}")  # junk beside the report
    # Execute
    loaded = load_runs(runs, exclude=runs / "report")
    # Assert
    assert len(loaded) == 11


def test_groups_ignore_seed_and_paths(tmp_path):
    # Prepare
    _write_run(tmp_path / "a", strategy="ffa", rank=2, seed=0, bal=0.6, sites={"s": 0.6}, up=1)
    _write_run(tmp_path / "b", strategy="ffa", rank=2, seed=1, bal=0.7, sites={"s": 0.7}, up=1)
    # Execute
    varying, groups = group_runs(load_runs(tmp_path))
    # Assert
    assert varying == [] and list(groups) == ["all runs"] and len(groups["all runs"]) == 2


def test_groups_are_ordered_by_setting_with_numbers_by_value(tmp_path):
    # Prepare: folder names that sort "16" before "2" as text
    for rank in (16, 2, 1):
        _write_run(tmp_path / f"ffa-rank-{rank}", strategy="ffa", rank=rank, seed=0, bal=0.6, sites={"s": 0.6}, up=1)
    # Execute
    varying, groups = group_runs(load_runs(tmp_path))
    # Assert
    assert varying == ["lora_rank"] and list(groups) == ["lora_rank=1", "lora_rank=2", "lora_rank=16"]


def test_run_from_an_older_version_groups_with_its_defaults(tmp_path):
    # Prepare: two seeds of one setting; one summary was written before the `secure` and `personalise` settings existed
    _write_run(tmp_path / "a", strategy="ffa", rank=2, seed=0, bal=0.6, sites={"s": 0.6}, up=1)
    _write_run(tmp_path / "b", strategy="ffa", rank=2, seed=1, bal=0.7, sites={"s": 0.7}, up=1)
    old = json.loads((tmp_path / "a" / "summary.json").read_text())
    del old["config"]["secure"], old["config"]["personalise"]
    (tmp_path / "a" / "summary.json").write_text(json.dumps(old))
    # Execute
    varying, groups = group_runs(load_runs(tmp_path))
    # Assert: one group of two seeds, no spurious "secure=None" setting
    assert varying == [] and len(groups["all runs"]) == 2


def test_unreadable_summary_is_skipped_with_a_warning(tmp_path, caplog):
    # Prepare
    _write_run(tmp_path / "ok", strategy="ffa", rank=2, seed=0, bal=0.6, sites={"s": 0.6}, up=1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    # Execute
    runs = load_runs(tmp_path)
    # Assert
    assert [r.path.name for r in runs] == ["ok"]
    assert "bad" in caplog.text and "not a FedEEG run summary" in caplog.text


def test_cli_report(runs_dir, tmp_path):
    # Execute
    res = CliRunner().invoke(app, ["report", str(runs_dir[0]), "--out", str(tmp_path / "rep"), "--title", "# T"])
    empty = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    # Assert
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# T")
    assert re.search(r"accuracy_vs_rank\.png", res.output)
    assert empty.exit_code == 2 and "does not exist" in " ".join(empty.output.split())


def test_local_finetune_column_matches_the_summaries(tmp_path):
    # Prepare: two seeds with a local fine-tune of the final model (summary["personalised"]), one group
    runs = tmp_path / "runs"
    tuned = []
    for seed, bal, after in ((0, 0.6, 0.7), (1, 0.62, 0.66)):
        _write_run(runs / f"s{seed}", strategy="ffa", rank=2, seed=seed, bal=bal, sites={"a": bal}, up=10)
        summary = json.loads((runs / f"s{seed}" / "summary.json").read_text())
        summary["personalised"] = {"finetune_epochs": 2, "test": {"balanced_accuracy": after}, "per_site": {}}
        (runs / f"s{seed}" / "summary.json").write_text(json.dumps(summary))
        tuned.append(after)
    # Execute
    text = (write_report(runs, plots=False) / "report.md").read_text()
    # Assert: the column is there, with mean ± sd of the fine-tuned numbers
    header, _, row = [line for line in text.splitlines() if line.startswith("|")][:3]
    assert "after local fine-tune % (pooled)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{100 * np.mean(tuned):.1f} ± {100 * np.std(tuned, ddof=1):.1f}"
