"""sha256 of files, read in 1 MiB chunks (constant memory); one implementation for the whole package."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20
_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file_cached(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, remembered per process for a file whose path, size and mtime are unchanged.

    For files checked on every message (a site's backbone checkpoint).
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = sha256_file(p)
    return _CACHE[key]


__all__ = ["sha256_file", "sha256_file_cached"]
