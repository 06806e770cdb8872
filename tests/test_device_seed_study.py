"""simulations/device_seed_study.py: the LaBraM-Base seed study's plan and its resumable results tarball."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "device_seed_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("device_seed_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, **kw):
    base = dict(data_dir="pack", backbone="labram-base", device="cuda", rounds=10, local_epochs=2, seeds="0,1,2",
                groups="all", only="", runs=tmp_path / "runs")
    return argparse.Namespace(**{**base, **kw})


def test_plan_is_the_labram_small_grid_with_labram_base(study, tmp_path):
    # Execute
    cells = study.plan(_args(tmp_path))
    # Assert: 43 settings x 3 seeds (25 + the centralized and local arms of the rank sweep and the target subsets),
    # one folder each, every cell the study's budget on eegmat's year split
    assert len(cells) == 129 and len({c.out for c in cells}) == 129
    assert {c.group for c in cells} == {"paper", "full", "head", "rank", "targets", "rank-arms", "target-arms"}
    for c in cells:
        s = c.settings
        assert (s["dataset"], s["split"], s["backbone"], s["device"], s["rounds"], s["local_epochs"]) == \
            ("eegmat", "year", "labram-base", "cuda", 10, 2)
    ranks = sorted({(c.settings["strategy"], c.settings.get("lora_rank", 2)) for c in cells if c.group == "rank"})
    assert ranks == [(s, r) for s in ("fedit", "ffa") for r in (1, 4, 8, 16)]
    assert {c.settings["lora_preset"] for c in cells if c.group == "targets"} == {"qkv", "mlp", "convs", "qkv+convs", "mlp+convs"}
    arms = {(c.group, c.settings["mode"]) for c in cells if c.group.endswith("-arms")}
    assert arms == {(g, m) for g in ("rank-arms", "target-arms") for m in ("centralized", "local")}
    assert [c.settings["seed"] for c in cells] == sorted(c.settings["seed"] for c in cells)  # seed-major


def test_only_filters_cells(study, tmp_path):
    cells = study.plan(_args(tmp_path, seeds="0", only=r"paper/mode-federated"))
    assert sorted(c.name for c in cells) == ["mode-federated_strategy-fedit_seed-0", "mode-federated_strategy-ffa_seed-0"]


def test_tarball_keeps_results_not_weights_and_resumes(study, tmp_path):
    # Prepare: one finished cell with weights and a plot, one cell stopped before its summary
    runs = tmp_path / "runs"
    done, stopped = runs / "paper" / "done", runs / "paper" / "stopped"
    for d in (done / "adapter", stopped):
        d.mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "scenario.toml", "simulate.log", "learning_curve.png", "adapter/w.safetensors"):
        (done / name).write_text(name)
    (stopped / "simulate.log").write_text("killed")
    # Execute
    n = study.pack(runs, tmp_path / "r.tar.xz")
    study.unpack([tmp_path / "r.tar.xz"], tmp_path / "again")
    # Assert
    got = sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert n == 5 and got == ["paper/done/metrics.jsonl", "paper/done/scenario.toml", "paper/done/simulate.log",
                              "paper/done/summary.json", "paper/stopped/simulate.log"]
