"""Scaling benchmark: wall time and peak memory of simulations with 10, 100 and 1000 sites.

Two measurements, each in its own process per size (so nothing is shared):

* ``--what simulate`` (the acceptance measurement): ``fedeeg simulate
  --scenario synthetic-N`` end to end (Flower simulation engine, Ray actors),
  with the peak of the summed resident memory (RSS) of the whole process tree
  (driver, Ray's raylet/GCS and every worker), sampled every 0.2 s. Needs
  issue 7's integration (partial participation, lazy client data, bounded
  actors); before it, the scenarios are refused.
* ``--what data``: the data layer alone, as the simulated clients would use
  it: every round samples ``sites_per_round`` sites (:func:`fedeeg.scenarios.sample_sites`)
  and loads each of them lazily (:func:`fedeeg.experiment.prepare_site`, the
  scenario's heterogeneous synthetic sites), in one process; peak RSS from
  ``getrusage``. Runs today.

Usage::

    python simulations/bench_scale.py --what data                      # 10, 100, 1000 sites; seconds to minutes
    python simulations/bench_scale.py --what simulate --rounds 3       # after integration; the 1000-site run is long
    python simulations/bench_scale.py --what data --sites 10 --rounds 1 --no-save   # smoke test

Writes ``simulations/results/bench_scale-WHAT.json`` and ``.md`` (unless ``--no-save``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = {10: "synthetic-10", 100: "synthetic-100", 1000: "synthetic-1000"}

_DATA_CHILD = r"""
import dataclasses, json, resource, sys, time
t0 = time.perf_counter()
from fedeeg.config import RunConfig
from fedeeg.scenarios import PROPOSED_FIELDS, load_scenario, resolve, sample_sites
from fedeeg.experiment import prepare_site
scenario, rounds = sys.argv[1], int(sys.argv[2])
sc = load_scenario(scenario)
cfg, pending = resolve(sc, {"rounds": rounds})
settings = {**{k: v[0] for k, v in PROPOSED_FIELDS.items()}, **sc.settings}
if pending:  # before integration: carry the scenario's extra settings on a RunConfig subclass
    extra = [(k, type(settings[k]), settings[k]) for k in PROPOSED_FIELDS if not hasattr(cfg, k)]
    Cfg = dataclasses.make_dataclass("ScenarioRunConfig", extra, bases=(RunConfig,), frozen=True)
    cfg = Cfg(**cfg.to_dict(), **{k: settings[k] for k, _, _ in extra})
k = int(getattr(cfg, "sites_per_round", 0))
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
loads = windows = 0
for rnd in range(1, rounds + 1):
    for i in sample_sites(rnd, cfg.federated_sites, k, cfg.seed):
        site = prepare_site(cfg, i)
        loads += 1
        windows += site.train.n_windows + site.test.n_windows
wall = time.perf_counter() - t1
print(json.dumps({"sites": cfg.federated_sites, "sites_per_round": k or cfg.federated_sites, "rounds": rounds,
                  "site_loads": loads, "windows_loaded": windows, "wall_seconds": round(wall, 2),
                  "import_seconds": round(t_import, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def _tree_rss(proc) -> int:
    """Summed RSS (bytes) of a process and all its descendants."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def bench_data(n_sites: int, rounds: int, scenario: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _DATA_CHILD, scenario, str(rounds)], env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"data benchmark of {scenario} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_simulate(n_sites: int, rounds: int, scenario: str, extra: list[str]) -> dict:
    import psutil

    out = tempfile.mkdtemp(prefix=f"bench-scale-{n_sites}-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedeeg.cli", "simulate", "--scenario", scenario, "--rounds", str(rounds),
           "--out", out, *extra]
    start = time.perf_counter()
    with open(Path(out) / "bench.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); log: {Path(out) / 'bench.log'}:\n"
                           f"{(Path(out) / 'bench.log').read_text()[-3000:]}")
    summary = json.loads((Path(out) / "summary.json").read_text())
    return {"sites": n_sites, "rounds": rounds, "wall_seconds": round(wall, 1), "peak_tree_rss_mib": round(peak / 2**20, 1),
            "balanced_accuracy": summary["test"]["balanced_accuracy"], "out": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("data", "simulate"), default="data")
    p.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000], choices=sorted(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--extra", default="", help="More `fedeeg simulate` options (--what simulate).")
    p.add_argument("--no-save", action="store_true", help="Print only; do not write simulations/results/.")
    args = p.parse_args()
    rows = []
    for n in args.sites:
        print(f"[bench] {args.what}: {SCENARIOS[n]}, {args.rounds} rounds ...", flush=True)
        if args.what == "data":
            row = bench_data(n, args.rounds, SCENARIOS[n])
        else:
            row = bench_simulate(n, args.rounds, SCENARIOS[n], args.extra.split())
        row["scenario"] = SCENARIOS[n]
        rows.append(row)
        print(json.dumps(row), flush=True)
    mem_key = "peak_rss_mib" if args.what == "data" else "peak_tree_rss_mib"
    lines = [f"Scaling ({args.what}), {args.rounds} rounds; {platform.node()} ({os.cpu_count()} CPUs), "
             f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.", "",
             "| scenario | sites | sites per round | wall s | peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['sites']} | {r.get('sites_per_round', '')} | {r['wall_seconds']} | {r[mem_key]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        res = Path(__file__).parent / "results"
        res.mkdir(exist_ok=True)
        (res / f"bench_scale-{args.what}.md").write_text(text)
        (res / f"bench_scale-{args.what}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
