"""Instant stand-ins for a site's training and evaluation, for tests about what travels and how it is merged."""

from __future__ import annotations

import numpy as np

from fedeeg.aggregation import travelling_names


def fake_train_local(cfg, message, pid, site, *, evaluation=None):
    """Deterministic stand-in for local training: global + a site- and round-specific change.

    Like :func:`fedeeg.federation.client_app.train_local`, fills ``evaluation`` (if given) with the evaluation of
    the received model (here :func:`fake_evaluate`'s).
    """
    from fedeeg.federation import records as R
    from fedeeg.training import TrainResult

    glob = R.record_to_numpy(message.content.array_records[R.ARRAYS])
    if evaluation is not None:
        evaluation.update(fake_evaluate(None, site.test), seconds=0.0)
    rnd = int(message.content.config_records[R.CONFIG]["server-round"])
    rng = np.random.default_rng(1000 * pid + rnd)
    trained = {k: (glob[k] + (0.002 * (pid + 1)) * rng.standard_normal(glob[k].shape)).astype(glob[k].dtype)
               for k in travelling_names(glob, cfg.strategy, rnd)}
    return glob, trained, TrainResult(loss=0.5 + 0.1 * pid, n_examples=site.train.n_windows, epochs=1, seconds=0.0,
                                      windows_per_second=0.0)


def fake_evaluate(model, windows, device="cpu", **kwargs):
    return {"balanced_accuracy": 0.5, "cohen_kappa": 0.0, "macro_f1": 0.5, "auroc": 0.5, "n_windows": 4,
            "confusion": [[1, 1], [1, 1]]}
