"""Fixed-point encoding of a site's update in the ring Z_{2^32}.

A site's update (the change of the travelling tensors, flattened to a vector
of ``d`` floats) becomes ``d + 2`` uint32 values:

1. ``d`` coordinates of ``w * clip(delta) + noise``, scaled by ``scale`` and
   stochastically rounded to integers (unbiased: ``floor(x * scale + u)`` with
   ``u`` uniform on [0, 1) from ChaCha20), where ``clip`` scales the whole
   vector down to L2 norm ``clip`` when it is longer, ``w = min(n, W) / W`` is
   the site's sample-count weight (``n`` training windows, ``W`` the weight
   cap) and ``noise`` is the site's share of the differential-privacy noise;
2. ``min(n, W)``, the site's (capped) window count;
3. ``w * min(loss, 100)`` at its own scale (the weighted training loss).

Negative integers are stored in two's complement; sums wrap modulo 2^32 and
decode as int32. With ``N`` sites every coordinate of the sum stays below
2^31 in absolute value when ``N * (bound * scale + 1) <= 2^31 - 1`` with
``bound = clip + 8 * noise_share_std`` (noise shares are truncated at 8 of
their standard deviations, a probability below 1.3e-15 per value), and
``N * W <= 2^31 - 1``: :class:`EncodingSpec` checks both and by default picks
the largest safe scale. So the server gets, exactly,

    sum_i w_i clip(delta_i) + noise,   sum_i min(n_i, W),   sum_i w_i loss_i

and divides: the example-weighted mean update, the total windows and the
weighted mean loss, with a decoding error below ``N / (scale * sum_i w_i)``
per coordinate (stochastic rounding, at most one unit per site).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .masking import fresh_seed, gaussian, keystream

#: Values of a sum must stay in [-2^31, 2^31 - 1] to decode unambiguously.
INT32_MAX = 2**31 - 1
RING = 2**32
#: Noise shares are truncated at this many standard deviations.
NOISE_TAIL = 8.0
#: Training losses are clipped to [0, LOSS_CAP] before encoding.
LOSS_CAP = 100.0


def ring_capacity_problem(*, clip: float, n_sites: int, weight_cap: int, noise_std: float = 0.0,
                          scale: float = 0.0) -> str | None:
    """Why the encoding would overflow the 32-bit ring, or None if it cannot.

    Parameters
    ----------
    clip : float
        L2 norm bound of one update (> 0).
    n_sites : int
        Most sites whose inputs are summed.
    weight_cap : int
        Window count at which a site's weight stops growing.
    noise_std : float
        Standard deviation of the summed DP noise per coordinate (``dp_sigma * clip``).
    scale : float
        Fixed-point scale; 0 = the largest safe one.
    """
    if clip <= 0:
        return f"'clip' must be > 0 for the fixed-point encoding, got {clip!r}"
    if n_sites < 1:
        return f"the number of sites must be >= 1, got {n_sites!r}"
    if n_sites * weight_cap > INT32_MAX:
        return (f"{n_sites} sites x weight cap {weight_cap} windows = {n_sites * weight_cap} exceeds 2^31 - 1; "
                f"lower 'secagg_weight_cap'")
    bound = clip + NOISE_TAIL * noise_std / math.sqrt(n_sites)
    top = (INT32_MAX / n_sites - 1) / bound
    if top < 1:
        return (f"{n_sites} sites with clip {clip} and DP noise std {noise_std} leave no room in the 32-bit ring "
                f"(per-coordinate bound {bound:.3g}); lower 'clip' or 'dp_sigma'")
    if scale and scale > top:
        return (f"'quant_scale' {scale:g} is too large for {n_sites} sites with clip {clip} and DP noise std "
                f"{noise_std}: the sum could reach 2^31 (largest safe scale {math.floor(top):d}); lower "
                f"'quant_scale' (0 = the largest safe one), 'clip' or 'dp_sigma'")
    return None


@dataclass(frozen=True)
class EncodingSpec:
    """How updates are clipped, weighted, noised and scaled into uint32 (see the module docstring).

    Parameters
    ----------
    clip : float
        L2 norm bound of one site's update vector.
    n_sites : int
        Sites taking part in the round (the most inputs a sum holds).
    weight_cap : int
        ``W``: a site's weight is ``min(n, W) / W``.
    noise_std : float
        Standard deviation, per coordinate, of the DP noise the *sum* carries;
        each site adds ``noise_std / sqrt(n_sites)``. 0 = no noise.
    scale : float
        Fixed-point scale of the update coordinates; 0 picks the largest one
        that cannot overflow.

    Raises
    ------
    ValueError
        When the 32-bit ring cannot hold the sum, naming the parameters.
    """

    clip: float
    n_sites: int
    weight_cap: int = 10_000
    noise_std: float = 0.0
    scale: float = 0.0

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"'noise_std' must be >= 0, got {self.noise_std!r}.")
        if self.weight_cap < 1:
            raise ValueError(f"'weight_cap' must be >= 1, got {self.weight_cap!r}.")
        problem = ring_capacity_problem(clip=self.clip, n_sites=self.n_sites, weight_cap=self.weight_cap,
                                        noise_std=self.noise_std, scale=self.scale)
        if problem:
            raise ValueError(f"Secure aggregation encoding: {problem}.")
        if not self.scale:
            object.__setattr__(self, "scale", float(math.floor((INT32_MAX / self.n_sites - 1) / self.coordinate_bound)))

    @property
    def noise_share_std(self) -> float:
        """Standard deviation of one site's noise share."""
        return self.noise_std / math.sqrt(self.n_sites)

    @property
    def coordinate_bound(self) -> float:
        """Largest absolute value of one encoded coordinate before scaling."""
        return self.clip + NOISE_TAIL * self.noise_share_std

    @property
    def loss_scale(self) -> float:
        """Fixed-point scale of the weighted loss entry."""
        return float(math.floor((INT32_MAX / self.n_sites - 1) / LOSS_CAP))

    def error_bound(self, n_inputs: int, total_weight: float) -> float:
        """Largest decoding (rounding) error of one coordinate of the weighted mean."""
        return float(n_inputs) / (self.scale * total_weight) if total_weight > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"clip": self.clip, "n_sites": self.n_sites, "weight_cap": self.weight_cap,
                "noise_std": self.noise_std, "scale": self.scale}


def vector_length(n_values: int) -> int:
    """uint32 values uploaded for an update of ``n_values`` floats."""
    return int(n_values) + 2


def clip_to_norm(vector: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Scale ``vector`` down to L2 norm ``clip`` when it is longer.

    Returns
    -------
    clipped : ndarray of float64, shape (d,)
    norm : float
        The norm before clipping.
    """
    vector = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(vector))
    if norm > clip:
        vector = vector * (clip / norm)
    return vector, norm


def _add_rounding_offsets(y: np.ndarray, seed: bytes, context: bytes) -> None:
    # y += u, u uniform on [0, 1) with 32 random bits (ChaCha20); then floor(y) is an unbiased rounding of y.
    u = np.frombuffer(keystream(seed, 4 * y.size, context=context), dtype="<u4")
    y += u * 2.0**-32


def _to_ring(y: np.ndarray) -> np.ndarray:
    # floor to integers, then two's complement modulo 2^32 (int64 -> uint32 keeps the low 32 bits)
    np.floor(y, out=y)
    return y.astype(np.int64).astype(np.uint32)


def to_signed(values: np.ndarray) -> np.ndarray:
    """uint32 ring elements -> int64 in [-2^31, 2^31)."""
    signed = np.asarray(values, dtype=np.uint32).astype(np.int64)
    signed[signed > INT32_MAX] -= RING
    return signed


def encode_update(vector: np.ndarray, n_examples: int, loss: float, spec: EncodingSpec, *,
                  seed: bytes | None = None) -> tuple[np.ndarray, dict]:
    """Clip, weight, noise and quantise one site's update.

    Parameters
    ----------
    vector : ndarray, shape (d,)
        The site's update (flattened deltas of the travelling tensors).
    n_examples : int
        The site's training windows.
    loss : float
        The site's mean training loss.
    spec : EncodingSpec
        The round's encoding.
    seed : bytes | None
        32 bytes seeding the rounding offsets and the noise (ChaCha20);
        None draws them from :func:`os.urandom`.

    Returns
    -------
    encoded : ndarray of uint32, shape (d + 2,)
    info : dict
        ``norm`` (before clipping) and ``clipped`` (bool): for the site's own log.
    """
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 0:
        raise ValueError(f"'n_examples' must be a non-negative int, got {n_examples!r}.")
    seed = fresh_seed() if seed is None else seed
    vector = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.sqrt(np.dot(vector, vector)))
    if not np.isfinite(norm):
        raise ValueError("The update holds non-finite values; it cannot be encoded.")
    count = min(int(n_examples), spec.weight_cap)
    weight = count / spec.weight_cap
    # One pass: clip (scale down to the bound), weight and fixed-point scale.
    y = vector * (weight * min(1.0, spec.clip / norm if norm > 0 else 1.0) * spec.scale)
    if spec.noise_std > 0:
        s = spec.noise_share_std
        y += np.clip(gaussian(seed, y.size, context=b"dp-noise"), -NOISE_TAIL, NOISE_TAIL) * (s * spec.scale)
    _add_rounding_offsets(y, seed, b"rounding")
    loss_value = min(max(float(loss), 0.0), LOSS_CAP) if np.isfinite(loss) else LOSS_CAP
    y_loss = np.array([loss_value * weight * spec.loss_scale])
    _add_rounding_offsets(y_loss, seed, b"rounding-loss")
    out = np.empty(y.size + 2, dtype=np.uint32)
    out[:-2] = _to_ring(y)
    out[-2] = count
    out[-1] = _to_ring(y_loss)[0]
    return out, {"norm": norm, "clipped": bool(norm > spec.clip)}


@dataclass(frozen=True)
class DecodedSum:
    """What the server learns from the unmasked sum of a round."""

    total: np.ndarray  #: sum_i w_i clip(delta_i) + noise, shape (d,), float64
    mean: np.ndarray  #: the example-weighted mean update, shape (d,), float64
    n_examples: int  #: sum_i min(n_i, W)
    total_weight: float  #: sum_i w_i
    mean_loss: float  #: weighted mean training loss
    error_bound: float  #: largest rounding error of one coordinate of ``mean``


def decode_sum(total: np.ndarray, spec: EncodingSpec, n_inputs: int) -> DecodedSum:
    """Decode the sum of ``n_inputs`` encoded updates.

    Parameters
    ----------
    total : ndarray of uint32, shape (d + 2,)
        The unmasked sum in the ring.
    spec : EncodingSpec
        The round's encoding.
    n_inputs : int
        How many inputs the sum holds.

    Raises
    ------
    ValueError
        The sum holds no training window (nothing to average).
    """
    signed = to_signed(total)
    count = int(signed[-2])
    if count <= 0:
        raise ValueError(f"The aggregate holds {count} training windows: nothing to average.")
    weight = count / spec.weight_cap
    summed = signed[:-2].astype(np.float64) / spec.scale
    return DecodedSum(
        total=summed,
        mean=summed / weight,
        n_examples=count,
        total_weight=weight,
        mean_loss=float(signed[-1]) / spec.loss_scale / weight,
        error_bound=spec.error_bound(n_inputs, weight),
    )


def ring_sum(vectors) -> np.ndarray:
    """Sum uint32 vectors modulo 2^32."""
    it = iter(vectors)
    acc = np.array(next(it), dtype=np.uint32, copy=True)
    for v in it:
        acc += v  # uint32 arithmetic wraps modulo 2^32
    return acc


__all__ = ["EncodingSpec", "ring_capacity_problem", "vector_length", "clip_to_norm", "encode_update",
           "decode_sum", "DecodedSum", "ring_sum", "to_signed", "NOISE_TAIL", "LOSS_CAP", "INT32_MAX"]
