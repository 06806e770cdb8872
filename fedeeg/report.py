"""One results report from a folder of runs: ``fedeeg report RUNS_DIR``.

Reads every run's ``summary.json`` and ``metrics.jsonl`` under ``RUNS_DIR``
(at any depth), groups runs that differ only by seed, and writes to the report
folder (default ``RUNS_DIR/report``):

* ``report.md``: a Markdown table, one row per group: held-out balanced
  accuracy (pooled, and the mean of the sites' own) as mean ± sd over seeds,
  the number of seeds, kappa, macro-F1, AUROC, trainable parameters, upload
  per site and round and in total, wall time; then one reproducing command per
  group;
* ``report.json``: the same rows as numbers;
* ``learning_curves.png`` (pooled held-out balanced accuracy per round, mean
  over seeds), ``accuracy_vs_rank.png`` (when ``lora_rank`` varies),
  ``accuracy_vs_bytes.png`` (accuracy against the bytes a site uploads over the
  whole run) and ``per_site.png`` (each site's balanced accuracy per group).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Config keys that never distinguish groups (seeds are what a group pools; paths and devices do not change results).
IGNORED_KEYS = ("seed", "out", "data_dir", "cache_dir", "device", "site_files", "checkpoint")
#: Metrics in the table (keys of summary["test"]).
METRICS = ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")


@dataclass
class Run:
    """One finished run: its folder, summary and per-round records."""

    path: Path
    summary: dict
    history: list[dict]

    @property
    def config(self) -> dict:
        """The run's settings. A setting its FedEEG version did not record yet takes today's default: every
        setting added later defaults to the behaviour from before it existed."""
        from .config import RunConfig

        return {**RunConfig().to_dict(), **self.summary.get("config", {})}


def load_runs(runs_dir: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> list[Run]:
    """Every run under ``runs_dir`` (folders holding a ``summary.json``), sorted by path.

    A summary that cannot be read is skipped with a warning naming it.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Runs folder {root} does not exist: give the folder that holds the runs (RUNS_DIR).")
    skip = Path(exclude).resolve() if exclude else None
    runs = []
    for path in sorted(root.rglob("summary.json")):
        if skip is not None and skip in path.resolve().parents:
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(summary, dict) or "test" not in summary:
                raise ValueError("no 'test' metrics")
        except (OSError, ValueError) as err:
            logger.warning("Skipping %s: not a FedEEG run summary (%s).", path, err)
            continue
        history = []
        metrics = path.parent / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    history.append(json.loads(line))
        runs.append(Run(path.parent, summary, history))
    return runs


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def group_runs(runs: list[Run]) -> tuple[list[str], dict[str, list[Run]]]:
    """Group runs that differ only in :data:`IGNORED_KEYS` (seeds).

    Returns
    -------
    varying : list of str
        The config keys whose values differ across runs (the table's
        distinguishing settings), in config order.
    groups : dict
        ``"key=value, key=value"`` (or ``"all runs"``) -> runs, ordered by
        the varying settings (numbers by value).
    """
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.config if k not in keys)
    varying = [k for k in keys if k not in IGNORED_KEYS
               and len({_hashable(r.config.get(k)) for r in runs}) > 1]
    def order(run: Run) -> tuple:  # by the varying settings, numbers by value (rank 2 before rank 16)
        values = [run.config.get(k) for k in varying]
        return tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))
                     for v in values)

    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=order):
        label = ", ".join(f"{k}={run.config.get(k)}" for k in varying) or "all runs"
        groups.setdefault(label, []).append(run)
    return varying, groups


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(groups: dict[str, list[Run]]) -> list[dict]:
    """One row of numbers per group (means over seeds; sd with ddof=1, 0 for one seed)."""
    rows = []
    for label, runs in groups.items():
        pooled = [_num(r.summary["test"].get("balanced_accuracy")) for r in runs]
        site_mean = [float(np.nanmean([_num(m.get("balanced_accuracy")) for m in r.summary.get("per_site", {}).values()]))
                     if r.summary.get("per_site") else float("nan") for r in runs]
        bal, bal_sd = _mean_sd(pooled)
        sm, sm_sd = _mean_sd(site_mean)
        # personalisation: each site's local fine-tune of the final model, evaluated beside it
        tuned = [_num(((r.summary.get("personalised") or {}).get("test") or {}).get("balanced_accuracy")) for r in runs]
        ft, ft_sd = _mean_sd(tuned)
        first = runs[0].summary
        up = int(first.get("communication", {}).get("bytes_up_per_site_per_round", 0))
        row = {
            "group": label,
            "seeds": sorted(int(r.summary.get("seed", r.config.get("seed", 0))) for r in runs),
            "n_seeds": len(runs),
            "balanced_accuracy": bal, "balanced_accuracy_sd": bal_sd,
            "site_mean_balanced_accuracy": sm, "site_mean_balanced_accuracy_sd": sm_sd,
            "finetuned_balanced_accuracy": ft, "finetuned_balanced_accuracy_sd": ft_sd,
            **{m: _mean_sd([_num(r.summary["test"].get(m)) for r in runs])[0] for m in METRICS[1:]},
            "trainable_parameters": int(first.get("trainable_parameters", 0)),
            "bytes_up_per_site_per_round": up,
            "bytes_up_per_site_total": up * int(first.get("rounds", 0)) if first.get("mode") == "federated" else 0,
            "wall_seconds": _mean_sd([_num(r.summary.get("wall_seconds")) for r in runs])[0],
            "config": runs[0].config,
            "runs": [str(r.path) for r in runs],
        }
        rows.append(row)
    return rows


def _pct(mean: float, sd: float) -> str:
    return "—" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _f3(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.3f}"


def command_for(config: dict) -> str:
    """A ``fedeeg simulate`` command for a config's first seed (the settings the CLI has options for)."""
    flags = ("dataset", "data_dir", "sites", "split", "test_fraction", "mode", "strategy", "rounds", "local_epochs",
             "backbone", "checkpoint", "lora_preset", "lora_rank", "conv_rank", "lr", "batch_size", "window_seconds",
             "seed", "out")
    from .config import RunConfig

    defaults = RunConfig().to_dict()
    always = ("dataset", "mode", "strategy", "rounds", "local_epochs", "backbone", "seed", "out")
    cmd = ["fedeeg", "simulate"]
    for key in flags:
        value = config.get(key)
        if value in (None, "") or (key not in always and value == defaults.get(key)):
            continue
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(cmd)


def markdown_table(rows: list[dict], *, title: str = "") -> str:
    """The report's Markdown: the table and one command per group."""
    lines = [title, ""] if title else []
    # A column for the sites' local fine-tune of the final model, where any run has one (finetune_epochs > 0).
    tuned = any(not math.isnan(r.get("finetuned_balanced_accuracy", float("nan"))) for r in rows)
    lines += [
        "| setting | balanced acc. % (pooled) | mean of sites' bal. acc. % "
        + ("| after local fine-tune % (pooled) " if tuned else "")
        + "| seeds | kappa | macro-F1 | AUROC | trainable params | upload B/site/round | upload B/site total | wall s |",
        "| --- | ---: | ---: " + ("| ---: " if tuned else "") + "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ft = (f"| {_pct(r['finetuned_balanced_accuracy'], r['finetuned_balanced_accuracy_sd'])} " if tuned else "")
        lines.append(
            f"| {r['group']} | {_pct(r['balanced_accuracy'], r['balanced_accuracy_sd'])} "
            f"| {_pct(r['site_mean_balanced_accuracy'], r['site_mean_balanced_accuracy_sd'])} {ft}| {r['n_seeds']} "
            f"| {_f3(r['cohen_kappa'])} | {_f3(r['macro_f1'])} | {_f3(r['auroc'])} | {r['trainable_parameters']:,} "
            f"| {r['bytes_up_per_site_per_round']:,} | {r['bytes_up_per_site_total']:,} | {r['wall_seconds']:.0f} |"
        )
    lines += ["", "Mean ± sd over seeds (sd with ddof = 1; 0 for one seed); held-out data of every site. "
              "Commands (first seed of each row; the others change `--seed`; runs made from a scenario are reproduced "
              "exactly by `fedeeg simulate --scenario RUN/scenario.toml` where the sweep wrote one):", "", "```"]
    lines += [command_for(r["config"]) for r in rows]
    lines += ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(groups: dict[str, list[Run]], path: Path) -> None:
    """Pooled held-out balanced accuracy per round, mean over seeds (band: ± sd)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, runs in groups.items():
        curves = [[_num((h["test"] or {}).get("balanced_accuracy")) for h in r.history] for r in runs if r.history]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves])
        mean, sd = np.nanmean(arr, axis=0), np.nanstd(arr, axis=0)
        x = np.arange(1, n + 1)
        line, = ax.plot(x, mean, "o-", ms=3, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out balanced accuracy (pooled)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _series(rows: list[dict], x_key: str) -> dict[str, list[dict]]:
    """Rows grouped by every varying setting except ``x_key`` (one line per series)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        parts = [p for p in r["group"].split(", ") if not p.startswith(f"{x_key}=")]
        out.setdefault(", ".join(parts) or "all", []).append(r)
    return out


def plot_accuracy_vs_rank(rows: list[dict], path: Path) -> None:
    """Balanced accuracy (mean ± sd over seeds) against the LoRA rank, one line per other setting."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, series in _series(rows, "lora_rank").items():
        series = sorted(series, key=lambda r: r["config"].get("lora_rank", 0))
        ax.errorbar([r["config"].get("lora_rank") for r in series], [100 * r["balanced_accuracy"] for r in series],
                    yerr=[100 * r["balanced_accuracy_sd"] for r in series], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("balanced accuracy % (pooled)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_bytes(rows: list[dict], path: Path) -> None:
    """Balanced accuracy against the bytes one site uploads over the whole run (federated rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    fed = [r for r in rows if r["bytes_up_per_site_total"] > 0]
    for r in fed:
        ax.errorbar(r["bytes_up_per_site_total"], 100 * r["balanced_accuracy"], yerr=100 * r["balanced_accuracy_sd"],
                    marker="o", capsize=3, label=r["group"])
    if fed:
        ax.set_xscale("log")
    ax.set_xlabel("bytes uploaded per site over the run")
    ax.set_ylabel("balanced accuracy % (pooled)")
    if fed:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no federated runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_site(groups: dict[str, list[Run]], path: Path) -> None:
    """Each site's held-out balanced accuracy (mean over seeds) per group, as grouped bars."""
    plt = _plt()
    sites = sorted({s for runs in groups.values() for r in runs for s in r.summary.get("per_site", {})})
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sites) * max(1, len(groups)) / 2), 4), dpi=100)
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(sites))
    for k, (label, runs) in enumerate(groups.items()):
        means = [np.nanmean([_num(r.summary["per_site"].get(s, {}).get("balanced_accuracy")) for r in runs])
                 if any(s in r.summary.get("per_site", {}) for r in runs) else np.nan for s in sites]
        ax.bar(x + k * width, 100 * np.array(means), width, label=label)
    ax.set_xticks(x + width * (len(groups) - 1) / 2)
    ax.set_xticklabels(sites, rotation=90 if len(sites) > 8 else 0, fontsize=7)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("balanced accuracy % (site's held-out data)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(runs_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, title: str = "",
                 plots: bool = True) -> Path:
    """Write the report of the runs under ``runs_dir`` to ``out`` (default ``runs_dir/report``).

    ``plots=False`` writes only ``report.md`` and ``report.json``.

    Returns
    -------
    out : Path
        The report folder (``report.md``, ``report.json`` and the PNG plots).

    Raises
    ------
    FileNotFoundError
        When ``runs_dir`` does not exist or holds no run.
    """
    out = Path(out) if out else Path(runs_dir) / "report"
    runs = load_runs(runs_dir, exclude=out)
    if not runs:
        raise FileNotFoundError(f"No runs under {runs_dir}: a run is a folder with a summary.json "
                                f"(`fedeeg simulate --out` or `fedeeg sweep` write them).")
    varying, groups = group_runs(runs)
    rows = summarise(groups)
    out.mkdir(parents=True, exist_ok=True)
    if title and not title.startswith("#"):
        title = f"# {title}"
    text = markdown_table(rows, title=title or f"# FedEEG report: {len(runs)} runs in {len(rows)} groups ({runs_dir})")
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"varying": varying, "rows": rows}, indent=2, default=str) + "\n",
                                     encoding="utf-8")
    if not plots:
        return out
    plot_learning_curves(groups, out / "learning_curves.png")
    if "lora_rank" in varying:
        plot_accuracy_vs_rank(rows, out / "accuracy_vs_rank.png")
    plot_accuracy_vs_bytes(rows, out / "accuracy_vs_bytes.png")
    plot_per_site(groups, out / "per_site.png")
    logger.info("report of %d runs (%d groups) written to %s", len(runs), len(rows), out)
    return out


__all__ = ["IGNORED_KEYS", "Run", "command_for", "group_runs", "load_runs", "markdown_table", "plot_accuracy_vs_bytes",
           "plot_accuracy_vs_rank", "plot_learning_curves", "plot_per_site", "summarise", "write_report"]
