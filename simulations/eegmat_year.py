"""eegmat, recording-year split (3 sites): federated ffa / fedit / full vs centralized vs local-only.

Runs `fedeeg simulate` for every cell and seed (skipping cells whose summary.json
exists), then prints a Markdown table of held-out balanced accuracy (mean ± sd
over seeds) and LoRA vs full upload sizes, and saves it to
simulations/results/eegmat_year.md.

Usage:
    python simulations/eegmat_year.py --data-dir ../shared/data/eegmat [--seeds 0 1 2] [--rounds 10]
        [--backbone labram-base] [--runs runs/eegmat-year]

Data: PhysioNet "EEG During Mental Arithmetic Tasks" v1.0.0 (Zyma et al., Data 2019; ODC-By 1.0).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

CELLS = [
    ("federated ffa", ["--mode", "federated", "--strategy", "ffa"]),
    ("federated fedit", ["--mode", "federated", "--strategy", "fedit"]),
    ("federated full", ["--mode", "federated", "--strategy", "full"]),
    ("centralized LoRA (ffa)", ["--mode", "centralized", "--strategy", "ffa"]),
    ("centralized LoRA (fedit)", ["--mode", "centralized", "--strategy", "fedit"]),
    ("local-only LoRA (fedit)", ["--mode", "local", "--strategy", "fedit"]),
    ("centralized full", ["--mode", "centralized", "--strategy", "full"]),
    ("local-only full", ["--mode", "local", "--strategy", "full"]),
]
#: Run when --cells is not given (the LoRA comparison of issue 2).
DEFAULT_CELLS = [c for c, _ in CELLS[:6]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--backbone", default="labram-small")
    p.add_argument("--runs", default="runs/eegmat-year")
    p.add_argument("--extra", default="", help="More `fedeeg simulate` options for every cell.")
    p.add_argument("--cells", nargs="+", default=None, metavar="CELL",
                   help=f"Cells to run (default: the first six): {', '.join(repr(c) for c, _ in CELLS)}.")
    p.add_argument("--tag", default="", help="Suffix of the result files (eegmat_year[-TAG].md/json), e.g. the backbone.")
    args = p.parse_args()
    cells = [(c, o) for c, o in CELLS if c in DEFAULT_CELLS]
    if args.cells:
        unknown = sorted(set(args.cells) - {c for c, _ in CELLS})
        if unknown:
            p.error(f"unknown cell(s) {unknown}; choose from {[c for c, _ in CELLS]}")
        cells = [(c, o) for c, o in CELLS if c in args.cells]
    fedeeg = [sys.executable, "-m", "fedeeg.cli"]
    rows = []
    for label, opts in cells:
        summaries, commands = [], []
        for seed in args.seeds:
            out = Path(args.runs) / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"
            cmd = ["fedeeg", "simulate", "--dataset", "eegmat", "--data-dir", args.data_dir, "--split", "year",
                   *opts, "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
                   "--backbone", args.backbone, "--seed", str(seed), "--out", str(out), *shlex.split(args.extra)]
            commands.append(shlex.join(cmd))
            if not (out / "summary.json").is_file():
                print(f"[run] {shlex.join(cmd)}", flush=True)
                subprocess.run(fedeeg + cmd[1:], check=True)
            summaries.append(json.loads((out / "summary.json").read_text()))
        bal = np.array([s["test"]["balanced_accuracy"] for s in summaries])
        site_mean = np.array([np.mean([m["balanced_accuracy"] for m in s["per_site"].values()]) for s in summaries])
        rows.append({
            "cell": label,
            "bal_mean": float(bal.mean()), "bal_sd": float(bal.std(ddof=1)) if len(bal) > 1 else 0.0,
            "site_mean": float(site_mean.mean()), "site_sd": float(site_mean.std(ddof=1)) if len(bal) > 1 else 0.0,
            "kappa": float(np.mean([s["test"]["cohen_kappa"] for s in summaries])),
            "auroc": float(np.mean([s["test"]["auroc"] for s in summaries])),
            "up": summaries[0]["communication"]["bytes_up_per_site_per_round"],
            "trainable": summaries[0]["trainable_parameters"],
            "wall": float(np.mean([s["wall_seconds"] for s in summaries])),
            "seeds": len(summaries),
            "command": commands[0],
        })
    lines = [
        f"eegmat, year split (3 sites), {args.backbone}, {args.rounds} rounds × {args.local_epochs} local epochs, "
        f"seeds {' '.join(map(str, args.seeds))}; held-out subjects.",
        "",
        "| setting | balanced acc. (pooled) | mean of sites' bal. acc. | kappa | AUROC | trainable params | upload B/site/round | wall s | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {100 * r['bal_mean']:.1f} ± {100 * r['bal_sd']:.1f} | {100 * r['site_mean']:.1f} ± {100 * r['site_sd']:.1f} "
            f"| {r['kappa']:.3f} | {r['auroc']:.3f} | {r['trainable']:,} | {r['up']:,} | {r['wall']:.0f} | {r['seeds']} |"
        )
    lines += ["", "Commands (seed 0; the others change `--seed`):", "", "```"] + [r["command"] for r in rows] + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    stem = "eegmat_year" + (f"-{args.tag}" if args.tag else "")
    (res / f"{stem}.md").write_text(text)
    (res / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
