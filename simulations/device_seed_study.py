"""The seed study (issue 7) with LaBraM-Base on a GPU host: many cells at once, resumable, results in one tarball.

The labram-small study (``simulations/results/seed_study_labram_small``, ``seed_study_head_only``, ``eegmat_year*``)
ran on 2 CPU cores; a LaBraM-Base cell takes 20+ min there. This script runs the same grid with ``labram-base``
(random init: no pretrained checkpoint exists offline) on one CUDA GPU (bf16 autocast, as ``fedeeg.training`` does on
CUDA), the same budget (10 rounds x 2 local epochs, batch 32, the default learning rates), the same eegmat year split
(3 sites), the same windows and seeds 0, 1, 2. Federated cells use the in-process engine (``FEDEEG_ENGINE=inprocess``:
no Ray; the same Flower messages and results as the Ray engine).

Groups of cells (each a ``fedeeg sweep`` grid; 129 cells for 3 seeds):

* ``paper``:   mode = federated, centralized, local  x  strategy = ffa, fedit   (LoRA ``paper`` preset, rank 2)
* ``full``:    mode = federated, centralized, local  x  strategy = full         (full fine-tuning)
* ``head``:    mode = federated, centralized, local  x  strategy = head         (frozen backbone, head only)
* ``rank``:    federated  x  strategy = ffa, fedit  x  lora_rank = 1, 4, 8, 16  (rank 2 is in ``paper``)
* ``targets``: federated ffa  x  lora_preset = qkv, mlp, convs, qkv+convs, mlp+convs
* ``rank-arms``:   centralized, local  x  fedit  x  lora_rank = 1, 4, 8, 16
* ``target-arms``: centralized, local  x  ffa  x  lora_preset = qkv, mlp, convs, qkv+convs, mlp+convs

Three steps:

1. ``prepare`` (here, once; needs MNE and the EDF files): writes ``.scratch/device-seed-study/``:
   ``eegmat-pack/`` (every subject's preprocessed windows, losslessly packed: :func:`fedeeg.data.eegmat.
   export_eegmat_pack`; the eegmat loader reads the folder as ``--data-dir``, bit-identical to the EDF folder, without
   MNE) and ``whl/`` (the wheels the device lacks for an in-process federated run: Flower and what it imports)::

       python simulations/device_seed_study.py prepare --data-dir ../shared/data/eegmat --wheels .whl

2. ``run`` (on the device, through ``simulations/device_seed_study.sh``, which installs ``whl/`` into a target folder
   first): unpacks the results of earlier calls (``STUDY/results/*.tar.xz``), skips the cells that have a
   ``summary.json``, runs the others ``--jobs`` at a time (one ``fedeeg simulate --scenario CELL/scenario.toml``
   process each), starts no cell that would not end before ``--budget`` seconds, stops the ones still running at the
   budget, and writes ``OUT/seed_study_labram_base.tar.xz`` (every cell's summary.json, metrics.jsonl, scenario.toml
   and simulate.log; no weights) and ``OUT/progress.txt``::

       bash simulations/device_seed_study.sh           # on the device; env: JOBS, BUDGET, STUDY, PYTHON, ARGS

   A second call continues where the first stopped, once its tarball is in ``STUDY/results/``.

3. ``collect`` (here): unpacks the tarball(s) into ``runs/seed-study-labram-base/`` and writes the report folder
   (``fedeeg report``'s table and plots)::

       python simulations/device_seed_study.py collect .device/*/seed_study_labram_base.tar.xz \\
           --report simulations/results/seed_study_labram_base

Local dry run of the whole path (tiny: labram-small, 1 round, CPU)::

    ARGS="--backbone labram-small --device cpu --rounds 1 --local-epochs 1 --seeds 0 --only 'paper/mode-federated_strategy-ffa'" \\
        bash simulations/device_seed_study.sh
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STUDY = Path(".scratch/device-seed-study")
RUNS = Path("runs/seed-study-labram-base")
TARBALL = "seed_study_labram_base.tar.xz"
#: The wheels (names as in their file names) of what the device image lacks for an in-process federated run from a
#: window pack: Flower and what importing it needs (grpcio and protobuf too, pinned to the versions Flower's
#: generated code was built with). Not mne, mne-bids, edfio, Ray, or Flower's server stack (SQLAlchemy, FastAPI...).
MIN_WHEELS = ("flwr", "grpcio", "grpcio_health_checking", "protobuf", "cryptography", "cffi", "pycparser",
              "pycryptodome", "iterators", "tomli", "tomli_w")
#: Files of a cell that travel back (no weights, no plots).
KEEP = ("summary.json", "metrics.jsonl", "scenario.toml", "simulate.log")


def groups(seeds: str) -> dict[str, tuple[str, dict]]:
    """The study's groups: name -> (sweep grid, settings of every cell of the group)."""
    s = f"seed={seeds}"
    return {
        "paper": (f"mode=federated,centralized,local strategy=ffa,fedit {s}", {}),
        "full": (f"mode=federated,centralized,local strategy=full {s}", {}),
        "head": (f"mode=federated,centralized,local strategy=head {s}", {}),
        "rank": (f"strategy=ffa,fedit lora_rank=1,4,8,16 {s}", {"mode": "federated"}),
        "targets": (f"lora_preset=qkv,mlp,convs,qkv+convs,mlp+convs {s}", {"mode": "federated", "strategy": "ffa"}),
        # the centralized and local-only arms of the rank sweep (plain LoRA) and of the target subsets
        "rank-arms": (f"mode=centralized,local lora_rank=1,4,8,16 {s}", {"strategy": "fedit"}),
        "target-arms": (f"mode=centralized,local lora_preset=qkv,mlp,convs,qkv+convs,mlp+convs {s}", {"strategy": "ffa"}),
    }


def plan(args) -> list:
    """Every cell of the chosen groups (fedeeg.sweep.Cell), seed-major, the longer cells of a seed first."""
    from fedeeg.sweep import parse_grid, plan_sweep

    base = {"dataset": "eegmat", "data_dir": args.data_dir, "split": "year", "backbone": args.backbone,
            "device": args.device, "rounds": args.rounds, "local_epochs": args.local_epochs}
    cells = []
    for name, (grid, extra) in groups(args.seeds).items():
        if args.groups != "all" and name not in args.groups.split(","):
            continue
        for cell in plan_sweep(None, parse_grid(grid), args.runs / name, {**base, **extra}):
            cell.group = name
            cells.append(cell)
    if args.only:
        cells = [c for c in cells if re.search(args.only, f"{c.group}/{c.name}")]
    weight = {"local": 0, "centralized": 1, "federated": 2}
    cells.sort(key=lambda c: (c.settings.get("seed", 0), c.settings.get("strategy") not in ("full",),
                              weight.get(c.settings.get("mode", "federated"), 2), c.group, c.name))
    return cells


def _log(path: Path, cell, status: str, seconds: float, rc) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"cell": f"{cell.group}/{cell.name}", "values": cell.values, "status": status,
                             "seconds": round(seconds, 2), "exit": rc, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def unpack(tarballs, runs: Path) -> int:
    """Extract earlier calls' tarballs into ``runs`` (their paths are relative to ``runs``); return the count."""
    n = 0
    runs.mkdir(parents=True, exist_ok=True)
    for tb in tarballs:
        with tarfile.open(tb, "r:xz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and not m.name.startswith(("/", ".."))
                       and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(runs, members=members, filter="data")
            else:  # pragma: no cover - Pythons without extraction filters
                tar.extractall(runs, members=members)
        n += 1
    return n


def pack(runs: Path, dest: Path) -> int:
    """Write ``dest`` (tar.xz) with every cell's small files and the sweep log; return the number of files."""
    files = sorted(p for p in runs.rglob("*") if p.is_file() and (p.name in KEEP or p.name in ("sweep.jsonl", "plan.json")))
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(runs)))
    os.replace(tmp, dest)
    return len(files)


def cmd_run(args) -> int:
    from fedeeg.sweep import write_cell_scenario

    t0 = time.monotonic()
    args.runs = Path(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = sorted((Path(args.study) / "results").glob("*.tar.xz")) + [Path(p) for p in args.resume]
    n_unpacked = unpack(earlier, args.runs)
    cells = plan(args)
    (args.runs / "plan.json").write_text(json.dumps([f"{c.group}/{c.name}" for c in cells], indent=0))
    todo = [c for c in cells if not c.done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} finished before (from {n_unpacked} tarball(s)), "
          f"{len(todo)} to run, {args.jobs} at a time, budget {args.budget:.0f} s", flush=True)
    env = {**os.environ, "FEDEEG_ENGINE": "inprocess", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    log = args.runs / "sweep.jsonl"
    running: dict = {}  # cell folder -> (cell, Popen, start, logfile)
    durations: list[float] = []
    ran, failed, stopped = [], [], []
    stop_at = args.budget - args.pack_seconds  # all cells end by then; the tarball is written after

    def finish(cell, status, rc):
        _, proc, start, fh = running.pop(str(cell.out))
        fh.close()
        seconds = time.monotonic() - start
        _log(log, cell, status, seconds, rc)
        if status == "ran":
            durations.append(seconds)
            ran.append(cell)
        elif status == "failed":
            failed.append(cell)
        else:
            stopped.append(cell)
        print(f"[{time.monotonic() - t0:6.0f} s] {status:7s} {cell.group}/{cell.name} ({seconds:.0f} s"
              + (f", exit {rc}" if status == "failed" else "") + ")", flush=True)

    queue = list(todo)
    while queue or running:
        now = time.monotonic() - t0
        for cell, proc, start, fh in list(running.values()):
            rc = proc.poll()
            if rc is not None:
                finish(cell, "ran" if rc == 0 and cell.done else "failed", rc)
        now = time.monotonic() - t0
        if now >= stop_at and running:
            for cell, proc, start, fh in list(running.values()):
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            for cell, proc, start, fh in list(running.values()):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                finish(cell, "stopped", proc.returncode)
            break
        # a cell starts only if it can end in time (the longest finished cell so far, or the first guess)
        estimate = max(durations) if durations else args.first_estimate
        while queue and len(running) < args.jobs and now + estimate < stop_at:
            cell = queue.pop(0)
            write_cell_scenario(cell)
            fh = open(cell.out / "simulate.log", "w", encoding="utf-8")
            cmd = [sys.executable, "-m", "fedeeg.cli", *cell.command()[1:]]
            running[str(cell.out)] = (cell, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                                             start_new_session=True), time.monotonic(), fh)
        if queue and not running and now + estimate >= stop_at:
            break
        time.sleep(0.5)
    left = [c for c in cells if not c.done]
    n_files = pack(args.runs, out / TARBALL)
    lines = [f"cells {len(cells)}: finished {len(cells) - len(left)} ({len(ran)} in this call), "
             f"failed {len(failed)}, stopped at the budget {len(stopped)}, not started {len(left) - len(failed) - len(stopped)}",
             f"this call: {time.monotonic() - t0:.0f} s; cell seconds: "
             + (f"min {min(durations):.0f}, median {sorted(durations)[len(durations) // 2]:.0f}, max {max(durations):.0f}"
                if durations else "none"),
             f"{out / TARBALL}: {n_files} files, {(out / TARBALL).stat().st_size / 1e6:.2f} MB",
             *(f"FAILED {c.group}/{c.name}: see {c.out / 'simulate.log'}" for c in failed),
             *(f"todo {c.group}/{c.name}" for c in left)]
    (out / "progress.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for c in failed[:3]:  # the end of the first failures' logs, for the caller's output tail
        print(f"--- {c.group}/{c.name} simulate.log (end) ---\n" + (c.out / "simulate.log").read_text(errors="replace")[-1500:])
    print("\n".join(lines[:3] + lines[3:3 + len(failed)]))
    print(f"left to run: {len(left)}" + (" -> call again with the tarball in STUDY/results/" if left else " -> done"))
    return 1 if failed else 0


def cmd_prepare(args) -> int:
    import logging

    from fedeeg.data.cache import default_cache_dir
    from fedeeg.data.eegmat import export_eegmat_pack

    logging.basicConfig(level=logging.WARNING)
    study = Path(args.study)
    wheels = study / "whl"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    for name in MIN_WHEELS:
        found = sorted(Path(args.wheels).glob(f"{name}-*.whl"))
        if len(found) != 1:
            raise SystemExit(f"{args.wheels}: expected one {name}-*.whl, found {[p.name for p in found]}")
        shutil.copy2(found[0], wheels / found[0].name)
    pack_dir = study / "eegmat-pack"
    if pack_dir.exists():
        shutil.rmtree(pack_dir)
    cache = None if args.cache_dir == "off" else (args.cache_dir or str(default_cache_dir()))
    export_eegmat_pack(args.data_dir, pack_dir, cache_dir=cache)
    size = sum(p.stat().st_size for p in study.rglob("*") if p.is_file())
    print(f"{study}: {size / 2**20:.1f} MiB (wheels {sum(p.stat().st_size for p in wheels.iterdir()) / 2**20:.1f} MiB, "
          f"pack {sum(p.stat().st_size for p in pack_dir.iterdir()) / 2**20:.1f} MiB)")
    return 0


def cmd_collect(args) -> int:
    from fedeeg.report import write_report

    n = unpack([Path(p) for p in args.tarballs], Path(args.runs))
    print(f"unpacked {n} tarball(s) into {args.runs}")
    if args.report:
        folder = write_report(args.runs, args.report, title=args.title)
        print(f"report in {folder}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="Run the cells not finished yet (on the device).")
    r.add_argument("--study", default=str(STUDY), help="The folder prepare wrote (results/ of earlier calls inside).")
    r.add_argument("--runs", default=str(RUNS), help="Where the cells run (relative: as the report shows them).")
    r.add_argument("--out", default=os.environ.get("OUT", "out"), help="Where the tarball goes (default $OUT).")
    r.add_argument("--resume", nargs="*", default=[], help="More tarballs of earlier calls.")
    r.add_argument("--data-dir", default=str(STUDY / "eegmat-pack"))
    r.add_argument("--backbone", default="labram-base")
    r.add_argument("--device", default="cuda")
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--local-epochs", type=int, default=2)
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--groups", default="all", help="all, or some of: paper,full,head,rank,targets")
    r.add_argument("--only", default="", help="Regex on GROUP/CELL: run only matching cells.")
    r.add_argument("--jobs", type=int, default=10, help="Cells at once.")
    r.add_argument("--threads", type=int, default=1, help="CPU threads per cell (OMP_NUM_THREADS).")
    r.add_argument("--budget", type=float, default=540.0, help="Seconds this call may take, the tarball included.")
    r.add_argument("--pack-seconds", type=float, default=15.0, help="Seconds kept for writing the tarball.")
    r.add_argument("--first-estimate", type=float, default=90.0, help="Guess of a cell's seconds before one ends.")
    r.set_defaults(func=cmd_run)
    q = sub.add_parser("prepare", help="Write STUDY/eegmat-pack and STUDY/whl (here, with MNE and the EDF files).")
    q.add_argument("--study", default=str(STUDY))
    q.add_argument("--data-dir", required=True, help="The eegmat folder with the EDF files.")
    q.add_argument("--wheels", default=".whl", help="Folder of cp312 wheels holding at least MIN_WHEELS.")
    q.add_argument("--cache-dir", default="", help="Window cache to read ('' = FedEEG's default, 'off' = none).")
    q.set_defaults(func=cmd_prepare)
    c = sub.add_parser("collect", help="Unpack the device's tarball(s) and write the report.")
    c.add_argument("tarballs", nargs="+")
    c.add_argument("--runs", default=str(RUNS))
    c.add_argument("--report", default="", help="Report folder (e.g. simulations/results/seed_study_labram_base).")
    c.add_argument("--title", default="Seed study: eegmat year split, LaBraM-Base (random init), H200")
    c.set_defaults(func=cmd_collect)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
