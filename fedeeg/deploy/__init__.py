"""Real deployment of a FedEEG federation (coordinator server and hospital client daemons).

Flower-free pieces live here: the coordinator's ``federation.toml``
(:mod:`.federation_config`), a site's deployment file (:mod:`.site_config`),
the consortium's certificates (:mod:`.certs`), the sites' keys (:mod:`.keys`),
the registry of enrolled sites (:mod:`.registry`), the hash-chained audit log
(:mod:`.audit`), atomic round checkpoints (:mod:`.state`) and the supervision of
Flower's SuperLink/SuperNode processes (:mod:`.launcher`). The Flower-specific
glue (quorum/deadline rounds, resume, the long-lived ServerApp/ClientApp
workers) is :mod:`fedeeg.federation.deployment`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: Site names: lower-case letters, digits, ``-`` and ``_`` (they name files and log entries).
SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name, else raise a ValueError saying what is allowed."""
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise ValueError(
            f"Invalid site name {name!r}: use 1-63 lower-case letters, digits, '-' or '_', starting with a letter "
            "or digit (e.g. 'hospital-a')."
        )
    return name


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write a secret file readable by its owner only (0600), replacing any existing file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def check_private(path: str | os.PathLike) -> Path:
    """Check that a private key file exists and is readable by its owner only.

    Raises
    ------
    FileNotFoundError
        If it does not exist.
    PermissionError
        If group or others may read it (``chmod 600 FILE`` fixes it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Private key {str(path)!r} not found.")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"Private key {str(path)!r} has permissions {oct(mode)}: others may read it. Run `chmod 600 {path}`."
        )
    return path


__all__ = ["SITE_NAME_RE", "check_site_name", "write_private", "check_private"]
