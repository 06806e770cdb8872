"""Distributed Gaussian noise and its Rényi-DP accounting.

Each site clips its update to L2 norm ``C`` and adds Gaussian noise of
standard deviation ``sigma * C / sqrt(N)`` (:class:`fedeeg.secagg.encoding.EncodingSpec`
with ``noise_std = sigma * C``); the secure sum of ``N`` such inputs carries
noise of standard deviation ``sigma * C``, while no single masked input is
revealed. Adding or removing one site changes the sum by at most ``C``
(site-level sensitivity), so one round is the Gaussian mechanism with noise
multiplier ``z = sigma * sqrt(m / N)`` when ``m`` of the ``N`` sites'
inputs (and noise shares) are in the sum, with Rényi DP of order ``alpha``

    RDP(alpha) = alpha / (2 z^2)

(Mironov, CSF 2017; no subsampling: every site takes part in every round).
Over rounds the RDP adds up and converts to (epsilon, delta)-DP by

    epsilon(delta) = min_alpha  sum_rounds RDP(alpha) + log(1 / delta) / (alpha - 1).

The noise is truncated at 8 standard deviations (see ``NOISE_TAIL``); the
accounting ignores that (a probability below 1.3e-15 per value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Rényi orders searched by the accountant.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                                          + [80, 96, 128, 192, 256, 512, 1024])


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian-mechanism step, ``alpha / (2 z^2)``, at every order.

    Parameters
    ----------
    noise_multiplier : float
        ``z`` = noise standard deviation / L2 sensitivity (> 0).
    orders : sequence of float
        Rényi orders alpha > 1.

    Returns
    -------
    rdp : ndarray, shape (n_orders,)
    """
    if not noise_multiplier > 0:
        raise ValueError(f"'noise_multiplier' must be > 0, got {noise_multiplier!r}.")
    return np.asarray(orders, dtype=np.float64) / (2.0 * float(noise_multiplier) ** 2)


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """Convert accumulated RDP to (epsilon, delta)-DP.

    Returns
    -------
    epsilon : float
    order : float
        The order that gives it.
    """
    if not 0 < delta < 1:
        raise ValueError(f"'delta' must be in (0, 1), got {delta!r}.")
    orders = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) + math.log(1.0 / delta) / (orders - 1.0)
    i = int(np.argmin(eps))
    return float(eps[i]), float(orders[i])


class RdpAccountant:
    """Adds the RDP of Gaussian rounds and reports (epsilon, delta).

    Parameters
    ----------
    delta : float
        The target delta, in (0, 1).
    orders : sequence of float
        Rényi orders searched.
    """

    def __init__(self, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"'delta' must be in (0, 1), got {delta!r}.")
        self.delta = float(delta)
        self.orders = tuple(float(a) for a in orders)
        self._rdp = np.zeros(len(self.orders))
        self.steps = 0

    def step(self, noise_multiplier: float) -> float:
        """Account one round; return the epsilon of that round alone."""
        rdp = gaussian_rdp(noise_multiplier, self.orders)
        self._rdp = self._rdp + rdp
        self.steps += 1
        return rdp_to_epsilon(rdp, self.delta, self.orders)[0]

    @property
    def epsilon(self) -> float:
        """Epsilon of all rounds so far (0 before the first)."""
        return rdp_to_epsilon(self._rdp, self.delta, self.orders)[0] if self.steps else 0.0


def effective_noise_multiplier(sigma: float, n_inputs: int, n_sites: int) -> float:
    """Noise multiplier of a sum holding ``n_inputs`` of ``n_sites`` noise shares of ``sigma / sqrt(n_sites)`` each."""
    return float(sigma) * math.sqrt(n_inputs / n_sites)


__all__ = ["DEFAULT_ORDERS", "gaussian_rdp", "rdp_to_epsilon", "RdpAccountant", "effective_noise_multiplier"]
