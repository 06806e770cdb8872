"""Aggregation of site updates and checks before anything is merged (Flower-free).

Every strategy here aggregates by a sum: the example-weighted mean of the
tensors that travel. What differs is which tensors travel:

- ``ffa``: LoRA B matrices and the head (A is frozen from the seed all sites
  share, so mean(B) @ A == mean(B @ A): exact);
- ``fedit``: LoRA A and B averaged separately (mean(B) @ mean(A) is not
  mean(B @ A): the inexact baseline);
- ``full``: every backbone weight (full fine-tuning), with BatchNorm running
  statistics where the backbone has them (EEGNet, EEG-Inception).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class UpdateRejected(ValueError):
    """A site's update failed the checks; the message says why."""


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, site: str = "?") -> None:
    """Check one site's update against the global tensors before merging.

    Parameters
    ----------
    update : mapping of str to ndarray
        The site's tensors.
    reference : mapping of str to ndarray
        The global tensors the update must match (names, shapes, dtypes).
    site : str
        Name of the site, for the message.

    Raises
    ------
    UpdateRejected
        Naming the site and every problem: missing or unexpected tensor names,
        wrong shapes or dtypes, non-finite values.
    """
    problems = []
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    for name in sorted(set(update) & set(reference)):
        got, ref = np.asarray(update[name]), np.asarray(reference[name])
        if got.shape != ref.shape:
            problems.append(f"{name}: shape {got.shape}, expected {ref.shape}")
        elif got.dtype != ref.dtype:
            problems.append(f"{name}: dtype {got.dtype}, expected {ref.dtype}")
        elif not np.all(np.isfinite(got)):
            problems.append(f"{name}: non-finite values")
    if problems:
        raise UpdateRejected(f"Update from site {site!r} rejected: " + "; ".join(problems))


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of tensors with the same names.

    Parameters
    ----------
    updates : sequence of (tensors, weight)
        Each site's tensors and its weight (number of training examples).

    Returns
    -------
    mean : dict of str to ndarray
        Same names, shapes and dtypes as the inputs.
    """
    if not updates:
        raise ValueError("Cannot aggregate zero updates.")
    weights = np.asarray([float(w) for _, w in updates], dtype=np.float64)
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"Aggregation weights must be non-negative with a positive sum, got {weights.tolist()}.")
    weights = weights / weights.sum()
    names = list(updates[0][0])
    out = {}
    for name in names:
        acc = np.zeros(np.shape(updates[0][0][name]), dtype=np.float64)
        for (tensors, _), w in zip(updates, weights, strict=True):
            acc += w * np.asarray(tensors[name], dtype=np.float64)
        dtype = np.asarray(updates[0][0][name]).dtype
        # Integer tensors (BatchNorm's num_batches_tracked) round to the nearest count.
        out[name] = (np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out


def lora_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The low-rank weight change ``B @ A`` of a LoRA pair.

    Parameters
    ----------
    a : ndarray, shape (rank, in_features) or a Conv2d lora_A weight (rank, in_ch, kh, kw)
    b : ndarray, shape (out_features, rank) or a Conv2d lora_B weight (out_ch, rank, 1, 1)

    Returns
    -------
    delta : ndarray, shape (out_features, in_features) (flattened kernels for convs)
    """
    a2 = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
    b2 = np.asarray(b, dtype=np.float64).reshape(b.shape[0], -1)
    return b2 @ a2


__all__ = ["UpdateRejected", "check_update", "weighted_average", "lora_delta"]
