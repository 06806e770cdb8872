"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret of up to 65 bytes (the protocol shares 32-byte seeds and X25519
private keys) is the constant term of a random polynomial of degree
``threshold - 1``; share ``x`` is the polynomial's value at ``x`` (x >= 1).
Any ``threshold`` shares give the secret back by Lagrange interpolation at 0;
fewer reveal nothing about it. The polynomial's coefficients come from
:func:`os.urandom`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

#: The Mersenne prime 2^521 - 1: every 65-byte secret is a field element.
PRIME = (1 << 521) - 1
#: Bytes of a serialised field element.
ELEMENT_BYTES = 66
#: Largest secret, in bytes.
MAX_SECRET_BYTES = 65


class ShareError(ValueError):
    """Shares that cannot give a secret back: too few, duplicated, malformed or inconsistent."""


def _random_element() -> int:
    # 80 random bytes reduced mod p: the bias is below 2^-110.
    return int.from_bytes(os.urandom(80), "big") % PRIME


def split_secret(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Split ``secret`` into one share per x-coordinate in ``xs``.

    Parameters
    ----------
    secret : bytes
        At most :data:`MAX_SECRET_BYTES` bytes.
    xs : sequence of int
        Distinct x-coordinates, each in [1, 2^31) (the holders' protocol ids).
    threshold : int
        Shares needed to give the secret back, 1 <= threshold <= len(xs).

    Returns
    -------
    shares : dict of int to int
        x -> y.
    """
    secret = bytes(secret)
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"'secret' must be at most {MAX_SECRET_BYTES} bytes, got {len(secret)}.")
    xs = [int(x) for x in xs]
    if len(set(xs)) != len(xs) or any(not 1 <= x < 2**31 for x in xs):
        raise ValueError(f"'xs' must be distinct integers in [1, 2^31), got {xs}.")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"'threshold' must be in [1, {len(xs)}] (the number of shares), got {threshold}.")
    coeffs = [int.from_bytes(secret, "big")] + [_random_element() for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine_shares(shares: Mapping[int, int], threshold: int, length: int, *, what: str = "secret") -> bytes:
    """Give a secret back from at least ``threshold`` shares.

    With more than ``threshold`` shares, the secret is interpolated from two
    different subsets and they must agree, so that one wrong share is detected
    rather than giving a wrong secret silently.

    Parameters
    ----------
    shares : mapping of int to int
        x -> y.
    threshold : int
        The threshold the secret was split with.
    length : int
        The secret's length in bytes.
    what : str
        Names the secret in error messages.

    Raises
    ------
    ShareError
        Fewer than ``threshold`` shares, or inconsistent shares.
    """
    points = sorted((int(x), int(y)) for x, y in shares.items())
    if len(points) < threshold:
        raise ShareError(f"{what}: {len(points)} share(s) received, {threshold} needed.")
    value = _interpolate_at_zero(points[:threshold])
    if len(points) > threshold and _interpolate_at_zero(points[-threshold:]) != value:
        raise ShareError(f"{what}: the {len(points)} shares received are inconsistent (at least one is wrong).")
    if value >= 1 << (8 * length):
        raise ShareError(f"{what}: the shares give a value longer than {length} bytes (wrong shares).")
    return value.to_bytes(length, "big")


def share_to_bytes(x: int, y: int) -> bytes:
    """Serialise one share: x (4 bytes) || y (66 bytes), big-endian."""
    return int(x).to_bytes(4, "big") + int(y).to_bytes(ELEMENT_BYTES, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    """Inverse of :func:`share_to_bytes`."""
    data = bytes(data)
    if len(data) != 4 + ELEMENT_BYTES:
        raise ShareError(f"A serialised share is {4 + ELEMENT_BYTES} bytes, got {len(data)}.")
    x, y = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
    if not (1 <= x and 0 <= y < PRIME):
        raise ShareError(f"Malformed share (x={x}).")
    return x, y


__all__ = ["PRIME", "ShareError", "split_secret", "combine_shares", "share_to_bytes", "share_from_bytes"]
