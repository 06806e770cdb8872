"""Cold vs warm loading of eegmat through the preprocessed-window disk cache.

Loads every eegmat subject (``load_eegmat_sites``, year split) with a fresh,
empty cache folder, each run in its own Python process so that nothing is
memoised in memory between them:

* **cold**: read the EDF files, filter, resample, window, hash the raw files
  (sha256 of the content) and store the windows in the cache;
* **warm**: the same call again: the keys come from the memoised file hashes,
  the windows from the memory-mapped cache;
* **warm, hashes recomputed** (informative): the file-hash memo deleted first,
  so every raw file is read and hashed again (what a first run on another
  machine sharing the cache, or a changed mtime, costs).

The load time is measured around ``load_eegmat_sites`` inside the process (the
import of FedEEG/MNE, about a second, is reported separately as process time).
The arrays of the warm runs are checked to be identical to the cold run's.
Prints the figures and saves ``simulations/results/bench_cache.json`` and ``.md``.

Usage::

    python simulations/bench_cache.py [--data-dir ../shared/data/eegmat] [--cache-dir DIR] [--keep]

Acceptance: warm at least 10x faster than cold.

Data: PhysioNet "EEG During Mental Arithmetic Tasks" v1.0.0 (Zyma et al., Data 2019; ODC-By 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "eegmat"
RESULTS = REPO / "simulations" / "results"


def _child(data_dir: str, cache_dir: str) -> None:
    """One load in this (fresh) process; prints a JSON line."""
    t_start = time.perf_counter()
    import hashlib

    from fedeeg.data.eegmat import load_eegmat_sites

    t_import = time.perf_counter()
    sites = load_eegmat_sites(data_dir, split="year", n_sites=None, cache_dir=cache_dir)
    t_load = time.perf_counter()
    digest = hashlib.sha256()
    n_windows = 0
    for site in sites:
        for arr in (site.windows.X, site.windows.y, site.windows.subject.astype("U16")):
            digest.update(arr.tobytes())
        n_windows += site.windows.n_windows
    print(json.dumps({
        "import_s": t_import - t_start,
        "load_s": t_load - t_import,
        "n_sites": len(sites),
        "n_subjects": sum(s.info["n_subjects"] for s in sites),
        "n_windows": n_windows,
        "shape": list(sites[0].windows.X.shape[1:]),
        "sha256": digest.hexdigest(),
    }))


def _run(data_dir: Path, cache_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--data-dir", str(data_dir), "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the child process failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=None, help="An empty (or absent) folder; default: a new temporary one.")
    p.add_argument("--keep", action="store_true", help="Keep the cache folder afterwards.")
    p.add_argument("--out", default=str(RESULTS / "bench_cache"), help="Output path without extension.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.data_dir, args.cache_dir)
        return 0

    data_dir = Path(args.data_dir).expanduser().resolve()
    if not (data_dir / "subject-info.csv").is_file():
        raise SystemExit(f"No eegmat folder at {data_dir} (needs subject-info.csv and SubjectNN_1/2.edf); pass --data-dir.")
    if args.cache_dir:
        cache_dir = Path(args.cache_dir).expanduser().resolve()
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise SystemExit(f"--cache-dir {cache_dir} is not empty; the cold run needs an empty cache.")
        cleanup = False
    else:
        cache_dir = Path(tempfile.mkdtemp(prefix="fedeeg-bench-cache-"))
        cleanup = not args.keep
    raw_bytes = sum(f.stat().st_size for f in data_dir.glob("Subject*_*.edf"))
    try:
        print(f"cold run (EDF + preprocessing + hashing + store) into {cache_dir} ...", flush=True)
        cold = _run(data_dir, cache_dir)
        print(f"  load {cold['load_s']:.2f} s", flush=True)
        warm = _run(data_dir, cache_dir)
        print(f"warm run: load {warm['load_s']:.3f} s", flush=True)
        (cache_dir / "file-hashes.json").unlink()
        rehash = _run(data_dir, cache_dir)
        print(f"warm run, file hashes recomputed: load {rehash['load_s']:.3f} s", flush=True)
        cache_bytes = _du(cache_dir)
    finally:
        if cleanup:
            shutil.rmtree(cache_dir, ignore_errors=True)
    identical = cold["sha256"] == warm["sha256"] == rehash["sha256"]
    ratio = cold["load_s"] / warm["load_s"]
    result = {
        "dataset": "eegmat (PhysioNet v1.0.0), year split, default PreprocessSpec",
        "data_dir": str(data_dir),
        "n_subjects": cold["n_subjects"],
        "n_windows": cold["n_windows"],
        "window_shape": cold["shape"],
        "raw_mb": raw_bytes / 1e6,
        "cache_mb": cache_bytes / 1e6,
        "cold_load_s": cold["load_s"],
        "warm_load_s": warm["load_s"],
        "warm_rehash_load_s": rehash["load_s"],
        "speedup": ratio,
        "speedup_rehash": cold["load_s"] / rehash["load_s"],
        "cold_process_s": cold["process_s"],
        "warm_process_s": warm["process_s"],
        "import_s": warm["import_s"],
        "identical_arrays": identical,
        "target_speedup": 10.0,
        "passed": bool(identical and ratio >= 10.0),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    md = "\n".join([
        "# Window cache: cold vs warm eegmat load",
        "",
        f"`python simulations/bench_cache.py` on {result['machine']}, {result['date']}; each run a fresh process, "
        f"{result['n_subjects']} subjects, {result['n_windows']} windows of {result['window_shape']} "
        f"(raw EDF {result['raw_mb']:.0f} MB, cache {result['cache_mb']:.0f} MB).",
        "",
        "| run | `load_eegmat_sites` (s) | process incl. imports (s) |",
        "| --- | ---: | ---: |",
        f"| cold: EDF read + filter + resample + hash + store | {cold['load_s']:.2f} | {cold['process_s']:.2f} |",
        f"| warm: from the cache (file hashes memoised) | {warm['load_s']:.3f} | {warm['process_s']:.2f} |",
        f"| warm, every raw file hashed again | {rehash['load_s']:.3f} | {rehash['process_s']:.2f} |",
        "",
        f"Speed-up of the load: **{ratio:.0f}x** (target >= 10x: {'met' if result['passed'] else 'NOT met'}); "
        f"{result['speedup_rehash']:.0f}x when every file is hashed again. "
        f"Arrays identical across the three runs: {identical}.",
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
