"""Aggregation of site updates and checks before anything is merged (Flower-free).

Every strategy here aggregates by a sum: the example-weighted mean of the
tensors that travel. What differs is which tensors travel:

- ``ffa``: LoRA B matrices and the head (A is frozen from the seed all sites
  share, so mean(B) @ A == mean(B @ A): exact);
- ``fedit``: LoRA A and B averaged separately (mean(B) @ mean(A) is not
  mean(B @ A): the inexact baseline);
- ``full``: every backbone weight (full fine-tuning), with BatchNorm running
  statistics where the backbone has them (EEGNet, EEG-Inception);
- ``rolora``: A and B train in alternate rounds (:func:`travelling_names`): in
  odd rounds B and the head (A is the same at every site, so mean(B) @ A ==
  mean(B @ A)), in even rounds A and the head (B is shared: B @ mean(A) ==
  mean(B @ A)); each round is exact.

Because every rule above is a sum, it also works under secure aggregation
(:mod:`fedeeg.secagg`), where the server only learns sums. Runs without it may
instead merge with the robust coordinate-wise :func:`coordinate_median` or
:func:`trimmed_mean` (unweighted), and bound each update's norm
(:func:`check_norm`).
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


def rolora_phase(server_round: int) -> str:
    """Which LoRA matrix trains under ``rolora`` in a round: ``"B"`` in odd rounds, ``"A"`` in even ones.

    B first: it starts at zero, so A's gradient is zero until B has moved.
    """
    return "B" if int(server_round) % 2 == 1 else "A"


def travelling_names(names, strategy: str, server_round: int) -> list[str]:
    """The tensors that train and travel in a round (all of them except under ``rolora``).

    Parameters
    ----------
    names : iterable of str
        The trainable tensors' names.
    strategy : str
        The run's strategy.
    server_round : int
        The round (from 1).
    """
    names = list(names)
    if strategy != "rolora":
        return names
    frozen = ".lora_A." if rolora_phase(server_round) == "B" else ".lora_B."
    return [n for n in names if frozen not in n]


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def float_names(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point tensors, sorted (the layout of a flattened update).

    Integer tensors (BatchNorm's ``num_batches_tracked``) are counters, not
    weights: they are left out of norms and of the secure sum.
    """
    return sorted(n for n, a in tensors.items() if _is_float(a))


def flatten_delta(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  names: Sequence[str]) -> np.ndarray:
    """The update's change from ``reference`` over ``names``, as one float64 vector of shape (n_values,)."""
    if not names:
        return np.zeros(0)
    return np.concatenate([(np.asarray(update[n], dtype=np.float64) - np.asarray(reference[n], dtype=np.float64)).ravel()
                           for n in names])


def apply_delta(reference: Mapping[str, np.ndarray], delta: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``reference`` plus a flattened change over ``names`` (see :func:`flatten_delta`); dtypes kept."""
    out = dict(reference)
    pos = 0
    for n in names:
        ref = np.asarray(reference[n])
        size = ref.size
        new = ref.astype(np.float64) + np.asarray(delta[pos:pos + size]).reshape(ref.shape)
        out[n] = (np.rint(new) if np.issubdtype(ref.dtype, np.integer) else new).astype(ref.dtype)
        pos += size
    if pos != np.asarray(delta).size:
        raise ValueError(f"The flattened change has {np.asarray(delta).size} values, the tensors {pos}.")
    return out


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the change of the floating-point tensors of ``update`` from ``reference``."""
    return float(np.linalg.norm(flatten_delta(update, reference, float_names(update))))


def clip_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                bound: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the change of ``update`` from ``reference`` down to L2 norm ``bound`` when longer.

    Returns
    -------
    clipped : dict of str to ndarray
        Same names, shapes and dtypes (integer tensors untouched).
    norm : float
        The norm before clipping.
    """
    names = float_names(update)
    delta = flatten_delta(update, reference, names)
    norm = float(np.linalg.norm(delta))
    out = dict(update)
    if bound > 0 and norm > bound:
        # A margin of 1e-6 keeps the clipped norm below the bound after the cast back to float32.
        out.update({k: v for k, v in apply_delta(reference, delta * (bound / norm) * (1 - 1e-6), names).items() if k in names})
    return out, norm


def check_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float, *,
               site: str = "?") -> float:
    """Reject an update whose change from ``reference`` is longer than ``bound`` (0 = no bound).

    Returns
    -------
    norm : float

    Raises
    ------
    UpdateRejected
        Naming the site, the norm and the bound.
    """
    norm = update_norm(update, reference)
    # Slack for the float32 rounding of a clipped update: one ulp of every reference value.
    ref_norm = np.sqrt(sum(float(np.sum(np.asarray(reference[n], dtype=np.float64) ** 2)) for n in float_names(update)))
    slack = float(np.finfo(np.float32).eps) * ref_norm
    if bound > 0 and norm > bound * (1 + 1e-5) + slack:
        raise UpdateRejected(f"Update from site {site!r} rejected: its change has L2 norm {norm:.4g}, above the "
                             f"bound clip={bound:g}.")
    return norm


def _stack(updates: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def _cast_like(acc: np.ndarray, like: np.ndarray) -> np.ndarray:
    dtype = np.asarray(like).dtype
    return (np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of the sites' tensors (unweighted; robust to a minority of bad updates)."""
    if not updates:
        raise ValueError("Cannot aggregate zero updates.")
    return {n: _cast_like(np.median(_stack(updates, n), axis=0), updates[0][n]) for n in updates[0]}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim: float = 0.2) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean: drop the ``floor(trim * n)`` largest and smallest values of each coordinate.

    Parameters
    ----------
    updates : sequence of mapping
        The sites' tensors.
    trim : float
        Fraction trimmed at each end, in [0, 0.5).
    """
    if not updates:
        raise ValueError("Cannot aggregate zero updates.")
    if not 0 <= trim < 0.5:
        raise ValueError(f"'trim' must be in [0, 0.5), got {trim!r}.")
    k = int(np.floor(trim * len(updates)))
    out = {}
    for n in updates[0]:
        s = np.sort(_stack(updates, n), axis=0)
        out[n] = _cast_like(s[k:len(updates) - k].mean(axis=0), updates[0][n])
    return out


def aggregate(updates: Sequence[tuple[Mapping[str, np.ndarray], float]], rule: str = "mean") -> dict[str, np.ndarray]:
    """Merge the sites' tensors with ``rule`` in {"mean", "median", "trimmed-mean"} (see RunConfig.aggregation)."""
    if rule == "mean":
        return weighted_average(updates)
    if rule == "median":
        return coordinate_median([u for u, _ in updates])
    if rule == "trimmed-mean":
        return trimmed_mean([u for u, _ in updates])
    raise ValueError(f"Invalid value for the 'aggregation' parameter. Allowed values are 'mean', 'median', "
                     f"'trimmed-mean', but got {rule!r} instead.")


__all__ = ["UpdateRejected", "check_update", "weighted_average", "lora_delta", "rolora_phase", "travelling_names",
           "float_names", "flatten_delta", "apply_delta", "update_norm", "clip_update", "check_norm",
           "coordinate_median", "trimmed_mean", "aggregate"]
