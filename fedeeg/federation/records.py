"""Conversions between FedEEG objects and Flower records, and what a site may send.

A site's reply carries exactly three records:

- ``arrays`` (ArrayRecord): the trainable tensors (LoRA adapter and head, or the
  full weights under ``full``);
- ``metrics`` (MetricRecord): aggregate scalars (counts, loss, metrics, a
  confusion matrix) — never per-window values;
- ``site`` (ConfigRecord): the site's name, channel names and sfreq.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"

METRIC_KEYS = ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Trainable tensors → ArrayRecord (names kept, CPU, contiguous)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord → dict of numpy arrays (names kept)."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def eval_to_metric_record(metrics: dict) -> MetricRecord:
    """Aggregate evaluation numbers of one site → MetricRecord."""
    rec = {k.replace("_", "-"): float(metrics[k]) for k in METRIC_KEYS}
    rec["num-examples"] = int(metrics["n_windows"])
    rec["confusion"] = [int(v) for v in np.asarray(metrics["confusion"]).ravel()]
    return MetricRecord(rec)


def metric_record_to_eval(rec: MetricRecord) -> dict:
    """Inverse of :func:`eval_to_metric_record`."""
    flat = np.asarray(rec["confusion"], dtype=np.int64)
    n = int(round(np.sqrt(flat.size)))
    if n * n != flat.size:
        raise ValueError(f"A site's confusion matrix has {flat.size} entries, which is not a square.")
    out = {k: float(rec[k.replace("_", "-")]) for k in METRIC_KEYS}
    out["n_windows"] = int(rec["num-examples"])
    out["confusion"] = flat.reshape(n, n).tolist()
    return out


def site_record(name: str, ch_names, sfreq: float) -> ConfigRecord:
    return ConfigRecord({"name": str(name), "ch-names": [str(c) for c in ch_names], "sfreq": float(sfreq)})
