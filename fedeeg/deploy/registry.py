"""The coordinator's registry of enrolled sites (``sites.json``).

``fedeeg site register NAME.pub`` adds a site's node-authentication public key
(and its secure-aggregation identity key when ``NAME.identity.pem.pub`` lies
beside it); ``fedeeg site revoke NAME`` marks it revoked. At start the server
registers every active site's key with the SuperLink, whose node
authentication then refuses any other key: an unknown or revoked site cannot
connect.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import check_site_name
from .keys import fingerprint, read_node_public_key

logger = logging.getLogger(__name__)

ACTIVE, REVOKED = "active", "revoked"


@dataclass(frozen=True)
class SiteEntry:
    """One enrolled site."""

    name: str
    public_key: str
    fingerprint: str
    status: str = ACTIVE
    identity_key: str | None = None
    registered_at: str = ""
    revoked_at: str | None = None
    reason: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SiteRegistry:
    """Read and change ``sites.json`` (every change is written atomically).

    Parameters
    ----------
    path : path-like
        The registry file (created by the first registration).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._sites: dict[str, SiteEntry] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self._sites = {name: SiteEntry(**entry) for name, entry in raw.get("sites", {}).items()}
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{self.path} is not a FedEEG site registry ({err}); restore it from a backup.") from None

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"sites": {n: asdict(e) for n, e in sorted(self._sites.items())}}, indent=2) + "\n")
        os.replace(tmp, self.path)

    def register(self, public_key_file: str | os.PathLike, *, name: str | None = None) -> SiteEntry:
        """Register a site's public key (``NAME.pub`` from ``fedeeg site new NAME``).

        The name defaults to the key's ``fedeeg-site:NAME`` comment, else the
        file's stem. Registering a name again replaces its key and reactivates
        it; a key already registered under another name is refused.
        """
        key, comment = read_node_public_key(public_key_file)
        path = Path(public_key_file)
        if name is None:
            name = comment.split(":", 1)[1] if comment.startswith("fedeeg-site:") else path.stem
        check_site_name(name)
        fp = fingerprint(key)
        for other in self._sites.values():
            if other.fingerprint == fp and other.name != name:
                raise ValueError(f"{path}: this key is already registered for site {other.name!r}; every site needs "
                                 "its own key (`fedeeg site new NAME` at the site).")
        identity = path.with_name(f"{name}.identity.pem.pub")
        entry = SiteEntry(name=name, public_key=key, fingerprint=fp, status=ACTIVE,
                          identity_key=identity.read_text() if identity.is_file() else None, registered_at=_now())
        self._sites[name] = entry
        self._write()
        logger.info("registered site %s (%s)", name, fp)
        return entry

    def revoke(self, name: str, *, reason: str = "") -> SiteEntry:
        """Mark a site revoked: the server stops accepting its key."""
        if name not in self._sites:
            raise KeyError(f"No site named {name!r} in {self.path}; registered: {sorted(self._sites) or 'none'}.")
        entry = SiteEntry(**{**asdict(self._sites[name]), "status": REVOKED, "revoked_at": _now(),
                             "reason": reason or None})
        self._sites[name] = entry
        self._write()
        logger.info("revoked site %s", name)
        return entry

    def get(self, name: str) -> SiteEntry | None:
        return self._sites.get(name)

    def by_fingerprint(self, fp: str) -> SiteEntry | None:
        return next((e for e in self._sites.values() if e.fingerprint == fp), None)

    def active(self) -> list[SiteEntry]:
        """Sites allowed to connect, by name."""
        return [e for _, e in sorted(self._sites.items()) if e.status == ACTIVE]

    def all(self) -> list[SiteEntry]:
        return [e for _, e in sorted(self._sites.items())]

    def is_allowed(self, public_key: str) -> bool:
        """True when ``public_key`` ("TYPE BASE64") belongs to an active site."""
        entry = self.by_fingerprint(fingerprint(public_key))
        return entry is not None and entry.status == ACTIVE


__all__ = ["SiteRegistry", "SiteEntry", "ACTIVE", "REVOKED"]
