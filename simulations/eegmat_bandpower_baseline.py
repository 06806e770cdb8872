"""Sanity baseline for the eegmat table: log band power + logistic regression, centralized,
on exactly the windows and subject splits that `fedeeg simulate --split year` uses.

It checks the data pipeline (labels, windows, preprocessing) independently of the
neural model: if this baseline separates rest from arithmetic on held-out subjects,
a near-chance network is the model's limit, not the data's.

Usage: python simulations/eegmat_bandpower_baseline.py --data-dir ../shared/data/eegmat [--seeds 0 1 2]
Needs scikit-learn (the `test` extra). Data: PhysioNet eegmat v1.0.0 (Zyma et al., Data 2019; ODC-By 1.0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.signal import welch

from fedeeg.config import RunConfig
from fedeeg.data.base import WindowSet
from fedeeg.experiment import prepare_sites
from fedeeg.metrics import compute_metrics, pool_metrics

BANDS = {"delta": (1, 4), "theta": (4, 8), "alpha": (8, 13), "beta": (13, 30), "gamma": (30, 45)}


def features(w: WindowSet) -> np.ndarray:
    """Log band power per channel and band, shape (n_windows, n_chans * n_bands)."""
    freqs, psd = welch(w.X, fs=w.sfreq, nperseg=int(w.sfreq), axis=-1)
    cols = [np.log(psd[..., (freqs >= lo) & (freqs < hi)].mean(-1) + 1e-12) for lo, hi in BANDS.values()]
    return np.stack(cols, axis=-1).reshape(w.n_windows, -1)


def main() -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        sites = prepare_sites(RunConfig(dataset="eegmat", data_dir=args.data_dir, split="year", seed=seed))
        train = WindowSet.concatenate([s.train for s in sites])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        clf.fit(features(train), train.y)
        per_site = [compute_metrics(s.test.y, clf.predict_proba(features(s.test))) for s in sites]
        pooled = pool_metrics(per_site)
        rows.append({"seed": seed, "balanced_accuracy": pooled["balanced_accuracy"],
                     "site_mean": float(np.mean([m["balanced_accuracy"] for m in per_site])), "auroc": pooled["auroc"]})
        print(f"seed {seed}: pooled balanced accuracy {pooled['balanced_accuracy']:.3f}, "
              f"mean of sites {rows[-1]['site_mean']:.3f}, AUROC {pooled['auroc']:.3f}")
    bal = np.array([r["balanced_accuracy"] for r in rows])
    print(f"band power + logistic regression (centralized): {100 * bal.mean():.1f} ± {100 * bal.std(ddof=1):.1f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eegmat_bandpower_baseline.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
