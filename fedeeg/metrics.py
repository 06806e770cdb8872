"""Classification metrics computed from aggregate counts.

Sites share only aggregate numbers: a confusion matrix and per-site scalar
metrics. Pooled balanced accuracy, Cohen's kappa and macro-F1 are exact from the
summed confusion matrices; the pooled AUROC is the test-window-weighted mean of
the sites' AUROCs (an exact pooled AUROC would need every window's score, which
never leaves a site).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRIC_NAMES = ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class.

    Parameters
    ----------
    y_true, y_pred : ndarray, shape (n_windows,)
        Class indices.
    n_classes : int
        Number of classes.

    Returns
    -------
    cm : ndarray of int64, shape (n_classes, n_classes)
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, Cohen's kappa and macro-F1 of a confusion matrix.

    Classes absent from the truth are left out of the balanced accuracy (as
    scikit-learn does, with a warning there); an empty matrix gives NaNs.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        return {"balanced_accuracy": math.nan, "cohen_kappa": math.nan, "macro_f1": math.nan}
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    labels_seen = (support + predicted) > 0
    p_o = tp.sum() / n
    p_e = float((support * predicted).sum()) / (n * n)
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan
    return {
        "balanced_accuracy": float(recall[present].mean()),
        "cohen_kappa": float(kappa),
        "macro_f1": float(f1[labels_seen].mean()),
    }


def _binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted as one half."""
    pos = y.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """AUROC: binary on the positive class's probability, else macro one-vs-rest.

    Parameters
    ----------
    y_true : ndarray, shape (n_windows,)
    proba : ndarray, shape (n_windows, n_classes)
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape[1] == 2:
        return _binary_auroc(y_true == 1, proba[:, 1])
    values = [_binary_auroc(y_true == k, proba[:, k]) for k in range(proba.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def compute_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict:
    """All metrics of one evaluation.

    Parameters
    ----------
    y_true : ndarray, shape (n_windows,)
        True class indices.
    proba : ndarray, shape (n_windows, n_classes)
        Predicted class probabilities.

    Returns
    -------
    metrics : dict
        ``balanced_accuracy``, ``cohen_kappa``, ``macro_f1``, ``auroc``,
        ``n_windows`` and ``confusion`` (a nested list, aggregate counts).
    """
    proba = np.asarray(proba)
    n_classes = proba.shape[1]
    cm = confusion_matrix(y_true, proba.argmax(axis=1), n_classes)
    out: dict = metrics_from_confusion(cm)
    out["auroc"] = auroc(y_true, proba)
    out["n_windows"] = int(len(y_true))
    out["confusion"] = cm.tolist()
    return out


def pool_metrics(results: Sequence[dict]) -> dict:
    """Pool per-site evaluations into one.

    Parameters
    ----------
    results : sequence of dict
        Each as returned by :func:`compute_metrics` (needs ``confusion``,
        ``auroc`` and ``n_windows``).

    Returns
    -------
    metrics : dict
        Exact pooled balanced accuracy, kappa and macro-F1 from the summed
        confusion matrices; ``auroc`` is the n_windows-weighted mean of the
        sites' AUROCs (NaNs skipped).
    """
    if not results:
        raise ValueError("Cannot pool metrics of zero sites.")
    cm = np.sum([np.asarray(r["confusion"]) for r in results], axis=0)
    out: dict = metrics_from_confusion(cm)
    pairs = [(r["auroc"], r["n_windows"]) for r in results if not math.isnan(r["auroc"])]
    out["auroc"] = float(np.average([a for a, _ in pairs], weights=[w for _, w in pairs])) if pairs else math.nan
    out["n_windows"] = int(cm.sum())
    out["confusion"] = cm.tolist()
    return out


__all__ = ["METRIC_NAMES", "confusion_matrix", "metrics_from_confusion", "auroc", "compute_metrics", "pool_metrics"]
