"""Evaluate a saved model folder on a site's data with the preprocessing recorded in it."""

from __future__ import annotations

import logging
import math
import os

from .metrics import METRIC_NAMES, pool_metrics
from .training import evaluate

logger = logging.getLogger(__name__)


def evaluate_model_dir(
    path: str | os.PathLike,
    *,
    dataset: str = "synthetic",
    data_dir: str | None = None,
    checkpoint: str | None = None,
    n_sites: int = 3,
    seed: int = 12345,
    device: str = "auto",
    site_files=(),
    cache_dir=None,
) -> dict:
    """Evaluate the model in ``path`` on every window of a dataset.

    Parameters
    ----------
    path : path-like
        Model folder (``OUT/adapter``).
    dataset : {"synthetic", "eegmat", "folder"}
        The data to evaluate on (all subjects).
    data_dir : str | None
        eegmat folder.
    checkpoint : str | None
        Backbone checkpoint if the model was trained on one.
    n_sites, seed : int
        Synthetic data: sites and seed to generate.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    site_files : sequence of path-like
        ``folder``: site TOML files (see :func:`fedeeg.data.load_site_config`);
        their recordings are read with the model's preprocessing and label set.
    cache_dir : path-like | None
        Preprocessed-window cache for eegmat/folder data (None: none).

    Returns
    -------
    result : dict
        ``balanced_accuracy``, ``cohen_kappa``, ``macro_f1``, ``auroc``,
        ``n_windows`` (all sites pooled) and ``per_site`` (the same per site).
    """
    from ._validation import check_option
    from .checkpoint import load_model_dir
    from .data import load_sites
    from .data.preprocessing import PreprocessSpec

    check_option("dataset", dataset, ("synthetic", "eegmat", "folder"))
    model, manifest = load_model_dir(path, checkpoint=checkpoint)
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    labels = tuple(manifest["label_names"])
    sites = load_sites(dataset, data_dir=data_dir, n_sites=n_sites, split="year", spec=spec, seed=seed,
                       site_files=site_files, label_names=labels, cache_dir=cache_dir)
    per_site = {}
    for site in sites:
        if site.windows.label_names != labels:
            raise ValueError(f"Site {site.name} has labels {site.windows.label_names}, the model was trained on {labels}.")
        if list(site.windows.ch_names) != list(manifest["channels"]):
            logger.warning("Site %s has channels %s; the model was trained on %s.", site.name, site.windows.ch_names, manifest["channels"])
        per_site[site.name] = evaluate(model, site.windows, device=device)
    pooled = pool_metrics(list(per_site.values()))

    def clean(m: dict) -> dict:
        out = {k: (None if math.isnan(m[k]) else float(m[k])) for k in METRIC_NAMES}
        out["n_windows"] = int(m["n_windows"])
        return out

    return {**clean(pooled), "per_site": {k: clean(v) for k, v in per_site.items()},
            "adapter": {"backbone": manifest["backbone"], "strategy": manifest.get("strategy"), "round": manifest.get("round")}}
