"""eegmat year split with the self-pretrained backbone: federated vs centralized vs local-only (issue 2's comparison).

Needs the per-seed checkpoints written by ``simulations/eegmat_pretrain.py`` (``RUNS/pretrain-central-sS/
backbone.safetensors``: masked-patch pretraining on that seed's training subjects only). Runs every cell and seed
with ``fedeeg simulate ... --checkpoint`` (skipping cells whose summary.json exists; the federated LoRA cells are
the ones eegmat_pretrain.py already ran), then prints and saves a Markdown table of held-out balanced accuracy
(mean ± sd over seeds) to simulations/results/eegmat_pretrained_modes.md.

Usage:
    python simulations/eegmat_pretrained_modes.py --data-dir ../shared/data/eegmat [--runs runs/eegmat-pretrain]

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

#: (label, run-folder stem, simulate options); the stems of the federated LoRA cells are eegmat_pretrain.py's.
CELLS = [
    ("federated ffa", "finetune-ffa", ["--mode", "federated", "--strategy", "ffa"]),
    ("federated fedit", "finetune-fedit", ["--mode", "federated", "--strategy", "fedit"]),
    ("federated full", "federated-full", ["--mode", "federated", "--strategy", "full"]),
    ("centralized LoRA (ffa)", "centralized-ffa", ["--mode", "centralized", "--strategy", "ffa"]),
    ("centralized LoRA (fedit)", "centralized-fedit", ["--mode", "centralized", "--strategy", "fedit"]),
    ("local-only LoRA (fedit)", "local-fedit", ["--mode", "local", "--strategy", "fedit"]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/eegmat-pretrain")
    p.add_argument("--no-run", action="store_true", help="Only tabulate the cells that exist.")
    args = p.parse_args()
    runs = Path(args.runs)
    rows, lines = [], []
    for label, stem, opts in CELLS:
        accs, commands = [], []
        for seed in args.seeds:
            ckpt = runs / f"pretrain-central-s{seed}" / "backbone.safetensors"
            out = runs / f"{stem}-central-s{seed}"
            cmd = ["fedeeg", "simulate", "--dataset", "eegmat", "--data-dir", args.data_dir, "--split", "year", *opts,
                   "--rounds", "10", "--local-epochs", "2", "--seed", str(seed), "--checkpoint", str(ckpt),
                   "--out", str(out)]
            commands.append(shlex.join(cmd))
            if not (out / "summary.json").is_file() and not args.no_run:
                print(f"[run] {shlex.join(cmd)}", flush=True)
                subprocess.run([sys.executable, "-m", "fedeeg.cli", *cmd[1:]], check=True)
            if (out / "summary.json").is_file():
                accs.append(json.loads((out / "summary.json").read_text())["test"]["balanced_accuracy"])
        if not accs:
            continue
        a = 100 * np.array(accs)
        rows.append({"cell": label, "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                     "per_seed": [float(x) for x in a], "seeds": len(a), "command": commands[0]})
    lines += [
        "eegmat, year split (3 sites), labram-small pretrained by `fedeeg pretrain` (masked patches, 40 epochs, each "
        "seed's training subjects only), 10 rounds × 2 local epochs; held-out subjects.",
        "",
        "| setting | balanced acc. (pooled) | per seed | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['mean']:.1f} ± {r['sd']:.1f} | {', '.join(f'{x:.1f}' for x in r['per_seed'])} | {r['seeds']} |")
    lines += ["", "Commands (seed 0; the others change `--seed` and the checkpoint):", "", "```"]
    lines += [r["command"] for r in rows] + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "eegmat_pretrained_modes.md").write_text(text)
    (res / "eegmat_pretrained_modes.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
