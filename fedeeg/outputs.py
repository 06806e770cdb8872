"""What a run writes to its output folder.

``summary.json``, ``metrics.jsonl`` (one line per round), ``adapter/`` (the
global model; ``adapters/SITE/`` for local-only runs) and ``learning_curve.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from . import __version__
from .config import RunConfig
from .experiment import RunResult, lora_spec, preprocess_spec
from .metrics import METRIC_NAMES

logger = logging.getLogger(__name__)


def _clean(metrics: dict) -> dict:
    out = {k: (None if isinstance(metrics.get(k), float) and math.isnan(metrics[k]) else metrics.get(k)) for k in METRIC_NAMES}
    if "n_windows" in metrics:
        out["n_windows"] = metrics["n_windows"]
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_summary(cfg: RunConfig, result: RunResult, *, wall_seconds: float) -> dict:
    """The content of ``summary.json``."""
    from .models import count_parameters

    model = next(iter(result.models.values()))
    trainable, total = count_parameters(model)
    summary = {
        "mode": cfg.mode,
        "strategy": cfg.strategy,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "seed": cfg.seed,
        "dataset": cfg.dataset,
        "split": cfg.split if cfg.dataset == "eegmat" else None,
        "backbone": cfg.backbone,
        "test": _clean(result.test),
        "per_site": {name: _clean(m) for name, m in result.per_site.items()},
        "communication": result.communication,
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "wall_seconds": round(float(wall_seconds), 2),
        "sites": result.sites,
        "label_names": list(result.label_names),
        "fedeeg_version": __version__,
        "config": cfg.to_dict(),
    }
    summary.update(result.extra)
    return summary


def model_manifest(cfg: RunConfig, result: RunResult, model) -> dict:
    """Facts recorded next to a saved model (see :mod:`fedeeg.checkpoint`)."""
    spec = preprocess_spec(cfg)
    return {
        "backbone": cfg.backbone,
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None) or _backbone_sha(model),
        "channels": list(result.channels),
        "sfreq": float(result.sfreq),
        "window_seconds": float(cfg.window_seconds),
        "n_times": int(round(cfg.window_seconds * result.sfreq)),
        "label_names": list(result.label_names),
        "preprocessing": spec.to_dict(),
        "lora": lora_spec(cfg).to_dict() if cfg.uses_lora else None,
        "strategy": cfg.strategy,
        "mode": cfg.mode,
        "round": cfg.rounds,
        "seed": cfg.seed,
        "dataset": cfg.dataset,
    }


def _backbone_sha(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "checkpoint_sha256", None)


def plot_learning_curve(history: list[dict], path: Path, title: str) -> None:
    """Balanced accuracy (pooled held-out) and training loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4), dpi=100)
    ax1.plot(rounds, [(h["test"] or {}).get("balanced_accuracy", float("nan")) for h in history], "o-", color="C0",
             label="held-out balanced acc.")
    for name in history[-1]["per_site"]:
        ax1.plot(rounds, [h["per_site"].get(name, {}).get("balanced_accuracy", float("nan")) for h in history],
                 "--", alpha=0.5, label=f"{name}")
    ax1.set_xlabel("round")
    ax1.set_ylabel("balanced accuracy")
    ax1.set_ylim(0.0, 1.0)
    ax1.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax2 = ax1.twinx()
    ax2.plot(rounds, [h["train_loss"] for h in history], "s-", color="C3", alpha=0.7, label="train loss")
    ax2.set_ylabel("train loss")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    ax1.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(cfg: RunConfig, result: RunResult, *, wall_seconds: float, out: str | os.PathLike | None = None) -> Path:
    """Write everything a run produces to ``out`` (default ``cfg.out``).

    Returns
    -------
    out : Path
    """
    from .checkpoint import save_model_dir

    out = Path(out or cfg.out)
    if not str(out):
        raise ValueError("write_outputs needs an output folder: set 'out' (--out).")
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(cfg, result, wall_seconds=wall_seconds)
    _atomic_write(out / "metrics.jsonl", "".join(json.dumps(_nan_to_none(h), default=_json_default) + "\n" for h in result.history))
    if cfg.mode == "local":
        for name, model in result.models.items():
            save_model_dir(model, out / "adapters" / name, manifest=model_manifest(cfg, result, model))
    else:
        model = result.models["global"]
        save_model_dir(model, out / "adapter", manifest=model_manifest(cfg, result, model))
    title = f"{cfg.mode} {cfg.strategy} on {cfg.dataset} ({cfg.backbone}, seed {cfg.seed})"
    plot_learning_curve(result.history, out / "learning_curve.png", title)
    _atomic_write(out / "summary.json", json.dumps(_nan_to_none(summary), indent=2, default=_json_default) + "\n")
    logger.info("wrote %s", out)
    return out


def _nan_to_none(obj):
    """Strict JSON: NaN metrics (e.g. AUROC of a one-class test set) become null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
