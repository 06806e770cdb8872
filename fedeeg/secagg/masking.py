"""Mask expansion and other randomness from a cryptographic stream (ChaCha20).

Every random vector of the protocol — the self mask, the pairwise masks, the
stochastic-rounding offsets and the differential-privacy noise — is ChaCha20
keystream under a key derived with HKDF from a 32-byte seed and a context
string. Nothing here calls numpy's or Python's random generators (a test
patches them to raise). numpy only reinterprets the keystream's bytes.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .keys import hkdf

SEED_BYTES = 32


def keystream(seed: bytes, n_bytes: int, *, context: bytes) -> bytes:
    """``n_bytes`` of ChaCha20 keystream under ``HKDF(seed, context)``.

    Parameters
    ----------
    seed : bytes
        32 secret bytes (a shared secret, a self-mask seed, ``os.urandom``).
    n_bytes : int
        Length of the stream.
    context : bytes
        Separates the streams drawn from one seed (mask, rounding, noise).
    """
    if len(seed) < 16:
        raise ValueError(f"A stream seed needs at least 16 bytes, got {len(seed)}.")
    key = hkdf(seed, b"stream/" + context)
    # cryptography's ChaCha20 takes a 16-byte nonce: a 32-bit block counter then the 96-bit nonce.
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(int(n_bytes)))


def expand_mask(seed: bytes, n: int, *, context: bytes = b"mask") -> np.ndarray:
    """A mask of ``n`` uniform uint32 values expanded from ``seed``.

    Returns
    -------
    mask : ndarray of uint32, shape (n,)
    """
    return np.frombuffer(keystream(seed, 4 * int(n), context=context), dtype="<u4").astype(np.uint32, copy=False)


def uniform(seed: bytes, n: int, *, context: bytes) -> np.ndarray:
    """``n`` floats uniform on [0, 1) with 53 random bits each.

    Returns
    -------
    u : ndarray of float64, shape (n,)
    """
    words = np.frombuffer(keystream(seed, 8 * int(n), context=context), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def gaussian(seed: bytes, n: int, *, context: bytes) -> np.ndarray:
    """``n`` standard normal floats (Box-Muller on :func:`uniform` pairs).

    Returns
    -------
    z : ndarray of float64, shape (n,)
    """
    m = (int(n) + 1) // 2
    u = uniform(seed, 2 * m, context=context)
    r = np.sqrt(-2.0 * np.log1p(-u[:m]))  # 1 - u in (0, 1]: log is finite
    theta = (2.0 * np.pi) * u[m:]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[: int(n)]


def fresh_seed() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


__all__ = ["SEED_BYTES", "keystream", "expand_mask", "uniform", "gaussian", "fresh_seed"]
