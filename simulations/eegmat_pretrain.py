"""eegmat, recording-year split: does masked-patch pretraining on the training subjects help federated LoRA?

For every seed, pretrain the backbone (self-supervised, labels ignored) on the
eegmat year split's *training* subjects — centrally (`fedeeg pretrain --central`)
and/or federated across the 3 year-sites (`fedeeg pretrain --federated`) — with
the same `--seed` and `--test-fraction` as the fine-tuning runs, so that the
subjects those runs hold out for testing are never seen in pretraining (each
seed re-draws the held-out subjects, hence one checkpoint per seed). Then run
federated fine-tuning `fedeeg simulate --dataset eegmat --split year --sites 3
--strategy S [--checkpoint CKPT]` from the random-init backbone and from every
pretrained one, and tabulate held-out balanced accuracy (mean ± sd over seeds)
and the paired difference to the random init.

Finished steps are skipped (a pretraining whose backbone.safetensors and
pretrain_manifest.json exist, a fine-tuning whose summary.json exists), so an
interrupted run resumes. Writes simulations/results/eegmat_pretrain.{md,json}.

Usage (the acceptance experiment; about 2 h on 2 CPU cores):
    python simulations/eegmat_pretrain.py --data-dir ../shared/data/eegmat --runs runs/eegmat-pretrain

A short version (one seed, one strategy, central pretraining only; ~10 min):
    python simulations/eegmat_pretrain.py --data-dir ../shared/data/eegmat --runs runs/eegmat-pretrain-quick \
        --seeds 0 --strategies fedit --pretrain central --pretrain-epochs 10 --rounds 5

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

def _run(cmd: list[str], done: Path) -> None:
    """Run ``fedeeg ...`` in this interpreter unless ``done`` exists (resume)."""
    if done.is_file():
        print(f"[skip] {done} exists", flush=True)
        return
    print(f"[run] {shlex.join(cmd)}", flush=True)
    subprocess.run([sys.executable, "-m", "fedeeg.cli", *cmd[1:]], check=True)


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbone", default="labram-small")
    p.add_argument("--test-fraction", type=float, default=0.34)
    p.add_argument("--pretrain", nargs="+", choices=["central", "federated"], default=["central", "federated"],
                   help="Pretraining modes to compare with the random init.")
    p.add_argument("--pretrain-epochs", type=int, default=50, help="Central pretraining epochs.")
    p.add_argument("--pretrain-rounds", type=int, default=25, help="Federated pretraining rounds.")
    p.add_argument("--pretrain-local-epochs", type=int, default=2, help="Federated pretraining local epochs per round.")
    p.add_argument("--pretrain-extra", default="", help="More `fedeeg pretrain` options (e.g. '--target raw --lr 1e-3').")
    p.add_argument("--strategies", nargs="+", choices=["ffa", "fedit", "full"], default=["ffa", "fedit", "full"])
    p.add_argument("--rounds", type=int, default=10, help="Federated fine-tuning rounds.")
    p.add_argument("--local-epochs", type=int, default=2, help="Fine-tuning local epochs per round.")
    p.add_argument("--extra", default="", help="More `fedeeg simulate` options for every fine-tuning run.")
    p.add_argument("--runs", default="runs/eegmat-pretrain")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"), help="Where the table is written.")
    args = p.parse_args()
    runs = Path(args.runs)
    data = ["--dataset", "eegmat", "--data-dir", args.data_dir, "--split", "year", "--sites", "3",
            "--test-fraction", str(args.test_fraction), "--backbone", args.backbone]

    # 1. Pretraining: one checkpoint per seed and mode (the seed fixes the held-out subjects).
    checkpoints: dict[tuple[str, int], Path] = {}
    pretrain_manifests: dict[str, list[dict]] = {m: [] for m in args.pretrain}
    pretrain_commands: dict[str, str] = {}
    for mode in args.pretrain:
        for seed in args.seeds:
            out = runs / f"pretrain-{mode}-s{seed}"
            schedule = (["--federated", "--rounds", str(args.pretrain_rounds), "--local-epochs", str(args.pretrain_local_epochs)]
                        if mode == "federated" else ["--central", "--epochs", str(args.pretrain_epochs)])
            cmd = ["fedeeg", "pretrain", *data, *schedule, "--seed", str(seed), "--out", str(out),
                   *shlex.split(args.pretrain_extra)]
            pretrain_commands.setdefault(mode, shlex.join(cmd))
            if not (out / "pretrain_manifest.json").is_file():
                (out / "backbone.safetensors").unlink(missing_ok=True)
            _run(cmd, out / "pretrain_manifest.json")
            checkpoints[(mode, seed)] = out / "backbone.safetensors"
            pretrain_manifests[mode].append(json.loads((out / "pretrain_manifest.json").read_text()))

    # 2. Federated fine-tuning from every initialisation.
    inits = ["random", *args.pretrain]
    rows = []
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for strategy in args.strategies:
        for init in inits:
            summaries, commands = [], []
            for seed in args.seeds:
                out = runs / f"finetune-{strategy}-{init}-s{seed}"
                cmd = ["fedeeg", "simulate", *data, "--mode", "federated", "--strategy", strategy,
                       "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--seed", str(seed),
                       "--out", str(out), *shlex.split(args.extra)]
                if init != "random":
                    cmd += ["--checkpoint", str(checkpoints[(init, seed)])]
                commands.append(shlex.join(cmd))
                _run(cmd, out / "summary.json")
                summaries.append(json.loads((out / "summary.json").read_text()))
            by_cell[(strategy, init)] = summaries
            bal = [s["test"]["balanced_accuracy"] for s in summaries]
            site_mean = [np.mean([m["balanced_accuracy"] for m in s["per_site"].values()]) for s in summaries]
            row = {
                "strategy": strategy, "init": init,
                "bal": _mean_sd(bal), "site_mean": _mean_sd(site_mean),
                "kappa": float(np.mean([s["test"]["cohen_kappa"] for s in summaries])),
                "auroc": float(np.nanmean([np.nan if s["test"]["auroc"] is None else s["test"]["auroc"] for s in summaries])),
                "per_seed": [round(float(b), 4) for b in bal],
                "seeds": list(args.seeds), "command": commands[0],
            }
            if init != "random":  # paired by seed: same held-out subjects, same fine-tuning seed
                ref = [s["test"]["balanced_accuracy"] for s in by_cell[(strategy, "random")]]
                row["delta"] = _mean_sd(np.asarray(bal) - np.asarray(ref))
            rows.append(row)

    # 3. Tables.
    seeds = " ".join(map(str, args.seeds))
    lines = [
        f"eegmat, year split (3 sites), {args.backbone}; federated fine-tuning {args.rounds} rounds × {args.local_epochs} "
        f"local epochs from a random-init vs a pretrained backbone; seeds {seeds}; held-out subjects (never seen in "
        "pretraining: each seed's checkpoint was pretrained on that seed's training subjects only).",
        "",
        "| strategy | backbone init | balanced acc. (pooled) | Δ vs random (paired) | mean of sites' bal. acc. | kappa | AUROC | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        delta = f"{100 * r['delta'][0]:+.1f} ± {100 * r['delta'][1]:.1f}" if "delta" in r else "—"
        init = "random" if r["init"] == "random" else f"{r['init']} pretrained"
        lines.append(f"| {r['strategy']} | {init} | {100 * r['bal'][0]:.1f} ± {100 * r['bal'][1]:.1f} | {delta} "
                     f"| {100 * r['site_mean'][0]:.1f} ± {100 * r['site_mean'][1]:.1f} | {r['kappa']:.3f} | {r['auroc']:.3f} "
                     f"| {len(r['seeds'])} |")
    pre_rows = []
    if args.pretrain:
        lines += ["", "Pretraining (masked-patch, per seed on the training subjects; mean over seeds):", "",
                  "| mode | schedule | windows | first → final loss | windows/s | wall s |", "| --- | --- | --- | --- | --- | --- |"]
        for mode, mans in pretrain_manifests.items():
            cfg = mans[0]["config"]
            schedule = (f"{cfg['rounds']} rounds × {cfg['local_epochs']} local epochs" if mode == "federated"
                        else f"{cfg['epochs']} epochs")
            first = np.mean([m["losses"][0] for m in mans])
            final = np.mean([m["losses"][-1] for m in mans])
            wps = np.mean([np.mean([h["windows_per_second"] for h in m["history"]]) for m in mans])
            wall = np.mean([m["wall_seconds"] or np.nan for m in mans])
            n = int(np.mean([m["n_windows"] for m in mans]))
            pre_rows.append({"mode": mode, "schedule": schedule, "n_windows": n, "first_loss": float(first),
                             "final_loss": float(final), "windows_per_second": float(wps), "wall_seconds": float(wall),
                             "target": cfg["target"], "mask_ratio": cfg["mask_ratio"], "command": pretrain_commands[mode]})
            lines.append(f"| {mode} | {schedule}, target {cfg['target']}, mask {cfg['mask_ratio']} | {n} "
                         f"| {first:.3f} → {final:.3f} | {wps:.0f} | {wall:.0f} |")
    lines += ["", "Commands (seed 0; the others change `--seed` and the checkpoint):", "", "```"]
    lines += [c for c in pretrain_commands.values()] + [r["command"] for r in rows] + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "eegmat_pretrain.md").write_text(text)
    (res / "eegmat_pretrain.json").write_text(json.dumps({"finetune": rows, "pretrain": pre_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
