"""Metrics against scikit-learn, and pooling from aggregate counts."""

import numpy as np
import pytest

from fedeeg.metrics import compute_metrics, pool_metrics

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n_classes", [2, 3])
def test_metrics_match_sklearn(n_classes):
    # Prepare
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 300)
    proba = rng.dirichlet(np.ones(n_classes), 300)
    proba[np.arange(300), y] += 0.3 * rng.random(300)  # some skill
    proba /= proba.sum(1, keepdims=True)
    proba[:30] = 1.0 / n_classes  # ties
    # Execute
    m = compute_metrics(y, proba)
    # Assert
    pred = proba.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["cohen_kappa"] == pytest.approx(sk.cohen_kappa_score(y, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    if n_classes == 2:
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, proba[:, 1]))
    else:
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def test_pooled_metrics_equal_metrics_of_pooled_predictions():
    # Prepare: three sites' predictions
    rng = np.random.default_rng(0)
    ys = [rng.integers(0, 2, n) for n in (40, 25, 60)]
    ps = [rng.dirichlet([1, 1], len(y)) for y in ys]
    # Execute
    pooled = pool_metrics([compute_metrics(y, p) for y, p in zip(ys, ps)])
    direct = compute_metrics(np.concatenate(ys), np.concatenate(ps))
    # Assert: exact for the confusion-matrix metrics
    for k in ("balanced_accuracy", "cohen_kappa", "macro_f1"):
        assert pooled[k] == pytest.approx(direct[k])
    assert pooled["n_windows"] == 125
    site_aurocs = [compute_metrics(y, p)["auroc"] for y, p in zip(ys, ps)]
    assert pooled["auroc"] == pytest.approx(np.average(site_aurocs, weights=[40, 25, 60]))


def test_single_class_auroc_is_nan_not_error():
    m = compute_metrics(np.zeros(5, int), np.tile([0.6, 0.4], (5, 1)))
    assert np.isnan(m["auroc"])
    assert m["balanced_accuracy"] == 1.0
