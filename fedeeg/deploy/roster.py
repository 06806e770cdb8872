"""The consortium's roster of secure-aggregation identity keys (``roster.json``).

In simulation every site's Ed25519 identity key is derived from the run's
seed; in a deployment each site has its own (``fedeeg site new NAME`` writes
``NAME.identity.pem``) and the coordinator registers its public half
(``fedeeg site register``). The roster lists the identity public keys of the
active sites; the coordinator writes it with ``fedeeg site roster`` and hands
it to every site out of band (the consortium's usual channel), and each site
points ``[deployment] roster`` at its copy.

The roster is what a site trusts: it checks its neighbours' signed key
advertisements against its own copy, so a coordinator that substitutes a key
of its own is caught by the sites, and a site whose key does not match its
entry is refused by the coordinator.

File format::

    {"sites": [{"name": "hospital-a", "identity_key": "-----BEGIN PUBLIC KEY-----...",
                "fingerprint": "<sha256 of the raw 32-byte key, hex>"}, ...]}

The entries are sorted by name; a site's protocol id is its 1-based position
in that list, which the coordinator and every site compute the same way.
Flower-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import check_site_name

logger = logging.getLogger(__name__)

#: ``Context.node_config`` keys a deployed site's worker sets for secure aggregation
#: (:meth:`fedeeg.deploy.site_config.ClientConfig.secagg_node_config`).
NODE_NAME, NODE_IDENTITY, NODE_ROSTER = "secagg-name", "secagg-identity", "secagg-roster"


class RosterError(ValueError):
    """A roster that cannot be made, read or used (names the file and what to do)."""


@dataclass(frozen=True)
class RosterEntry:
    """One site of the roster.

    Parameters
    ----------
    name : str
        The site's name (as registered).
    identity_key : str
        Its Ed25519 identity public key (PEM, SubjectPublicKeyInfo).
    fingerprint : str
        sha256 of the raw 32-byte public key, hex (:func:`identity_fingerprint`).
    """

    name: str
    identity_key: str
    fingerprint: str

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return _raw(_parse_pem(self.identity_key, f"the roster entry of {self.name!r}"))


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _parse_pem(pem: str, what: str, hint: str = "") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(str(pem).encode())
    except (ValueError, TypeError) as err:
        raise RosterError(f"{what}: identity_key is not a PEM public key ({err}).{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RosterError(f"{what}: identity_key holds a {type(key).__name__}, expected an Ed25519 key "
                          f"(NAME.identity.pem.pub from `fedeeg site new NAME`).{hint}")
    return key


def identity_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """sha256 (hex) of an identity key's raw 32-byte public key.

    Parameters
    ----------
    key : Ed25519PrivateKey | Ed25519PublicKey | bytes
        A private key (its public half is used), a public key, or the raw
        32 public bytes.
    """
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = _raw(key) if isinstance(key, Ed25519PublicKey) else bytes(key)
    return hashlib.sha256(raw).hexdigest()


def roster_digest(roster: dict[int, bytes]) -> str:
    """sha256 (hex, first 16 digits) of a roster ``{protocol id: raw public key}``: equal rosters, equal digests."""
    h = hashlib.sha256()
    for sid in sorted(roster):
        h.update(int(sid).to_bytes(8, "big") + bytes(roster[sid]))
    return h.hexdigest()[:16]


class Roster:
    """The sites' identity public keys, sorted by name; protocol id = 1-based position.

    Parameters
    ----------
    entries : list of RosterEntry
        Sorted by name, names and keys unique.
    source : str
        Where the roster came from (for error messages).
    """

    def __init__(self, entries: list[RosterEntry], *, source: str = "the roster") -> None:
        self.entries = list(entries)
        self.source = source
        names = [e.name for e in self.entries]
        if not self.entries:
            raise RosterError(f"{source} lists no site.")
        if names != sorted(names) or len(set(names)) != len(names):
            raise RosterError(f"{source}: the sites must be listed once each, sorted by name; got {names}. "
                              "Make the roster again with `fedeeg site roster`.")
        self._keys: dict[int, bytes] = {}
        seen: dict[bytes, str] = {}
        for sid, e in enumerate(self.entries, start=1):
            check_site_name(e.name)
            raw = _raw(_parse_pem(e.identity_key, f"{source}: the entry of {e.name!r}",
                                  hint=" Get the roster again from the coordinator (`fedeeg site roster`)."))
            fp = identity_fingerprint(raw)
            if e.fingerprint != fp:
                raise RosterError(f"{source}: the entry of {e.name!r} says fingerprint {e.fingerprint!r} but its "
                                  f"identity_key has fingerprint {fp!r} (altered?); get the roster again from the "
                                  "coordinator.")
            if raw in seen:
                raise RosterError(f"{source}: sites {seen[raw]!r} and {e.name!r} have the same identity key; every "
                                  "site needs its own (`fedeeg site new NAME` at the site).")
            seen[raw] = e.name
            self._keys[sid] = raw

    @property
    def names(self) -> list[str]:
        """The sites' names, in protocol-id order."""
        return [e.name for e in self.entries]

    def site_id(self, name: str) -> int:
        """The protocol id (1-based position) of site ``name``."""
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise RosterError(f"Site {name!r} is not in {self.source} (sites: {', '.join(self.names)}). Ask the "
                              f"coordinator to register {name}.identity.pem.pub (`fedeeg site register`) and send "
                              "the new roster (`fedeeg site roster`).") from None

    def entry(self, name: str) -> RosterEntry:
        """The entry of site ``name``."""
        return self.entries[self.site_id(name) - 1]

    def public_keys(self) -> dict[int, bytes]:
        """Raw public identity keys by protocol id (what :class:`fedeeg.secagg.SecAggServer` takes)."""
        return dict(self._keys)

    def to_dict(self) -> dict:
        """The JSON form (``{"sites": [...]}``)."""
        return {"sites": [{"name": e.name, "identity_key": e.identity_key, "fingerprint": e.fingerprint}
                          for e in self.entries]}


def roster_from_registry(registry) -> Roster:
    """The roster of a registry's active sites.

    Parameters
    ----------
    registry : SiteRegistry | path-like
        The coordinator's registry (``sites.json``).

    Raises
    ------
    RosterError
        When an active site has no identity key (it was registered without
        ``NAME.identity.pem.pub`` beside ``NAME.pub``), or none is active.
    """
    from .registry import SiteRegistry

    if not isinstance(registry, SiteRegistry):
        registry = SiteRegistry(registry)
    active = registry.active()
    if not active:
        raise RosterError(f"No active site in {registry.path}: register the sites first "
                          "(`fedeeg site register NAME.pub --registry ...`).")
    lacking = [e.name for e in active if not e.identity_key]
    if lacking:
        raise RosterError(f"Active site(s) {lacking} in {registry.path} have no secure-aggregation identity key. "
                          "Register each again with its NAME.identity.pem.pub beside NAME.pub "
                          "(`fedeeg site register NAME.pub`), or revoke it (`fedeeg site revoke NAME`).")
    entries = []
    for e in active:  # active() is sorted by name
        raw = _raw(_parse_pem(e.identity_key, f"{registry.path}: site {e.name!r}"))
        entries.append(RosterEntry(e.name, e.identity_key, identity_fingerprint(raw)))
    return Roster(entries, source=str(registry.path))


def write_roster(registry, out: str | os.PathLike) -> Path:
    """Write the roster of a registry's active sites to ``out`` (JSON), atomically.

    Parameters
    ----------
    registry : SiteRegistry | path-like
        The coordinator's registry.
    out : path-like
        The roster file to distribute to every site.

    Returns
    -------
    path : Path
    """
    roster = roster_from_registry(registry)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(roster.to_dict(), indent=2) + "\n")
    os.replace(tmp, out)
    logger.info("roster of %d sites written to %s: %s", len(roster.entries), out, ", ".join(roster.names))
    return out


def read_roster(path: str | os.PathLike) -> Roster:
    """Read and check a roster file written by :func:`write_roster`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    RosterError
        It is not a roster, an entry's key is not an Ed25519 PEM public key,
        a fingerprint does not match its key, or names or keys repeat.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Roster file {str(path)!r} not found; the coordinator makes it with "
                                "`fedeeg site roster --registry sites.json --out roster.json`.")
    try:
        raw = json.loads(path.read_text())
        sites = raw["sites"]
        entries = [RosterEntry(str(s["name"]), str(s["identity_key"]), str(s["fingerprint"])) for s in sites]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise RosterError(f"{path} is not a FedEEG roster (expected {{\"sites\": [{{\"name\", \"identity_key\", "
                          f"\"fingerprint\"}}, ...]}}; {type(err).__name__}: {err}). Get it again from the "
                          "coordinator.") from None
    return Roster(entries, source=str(path))


def registry_public_keys(registry) -> dict[int, bytes]:
    """The coordinator's roster: raw identity public keys by protocol id, from the registry's active sites."""
    return roster_from_registry(registry).public_keys()


def load_site_keys(name: str, identity: str | os.PathLike | None,
                   roster: str | os.PathLike | None) -> tuple[Ed25519PrivateKey, dict[int, bytes], int]:
    """A deployed site's secure-aggregation keys: its identity, the roster it trusts, its protocol id.

    Parameters
    ----------
    name : str
        The site's name (``ClientConfig.name``).
    identity : path-like | None
        Its Ed25519 identity private key (``[deployment] identity_key``).
    roster : path-like | None
        The roster from the coordinator (``[deployment] roster``).

    Returns
    -------
    identity : Ed25519PrivateKey
    public_keys : dict of int to bytes
        The roster's raw public keys by protocol id.
    site_id : int
        This site's protocol id.

    Raises
    ------
    RosterError
        No roster configured, the site is not in it, or its identity key does
        not match its entry.
    """
    from ..secagg.keys import load_identity

    if not roster:
        raise RosterError("This run uses secure aggregation, but the site file sets no [deployment] roster. Get "
                          "roster.json from the coordinator (made with `fedeeg site roster`), set "
                          "roster = \"PATH\" under [deployment] in site.toml, and restart `fedeeg client start`.")
    if not identity:
        raise RosterError(f"No secure-aggregation identity key for site {name!r}: set [deployment] identity_key to "
                          f"{name}.identity.pem (made by `fedeeg site new {name}`).")
    if not Path(identity).is_file():
        raise FileNotFoundError(f"[deployment] identity_key: {str(identity)!r} not found; it is made by "
                                f"`fedeeg site new {name}` beside {name}.key. Set identity_key to its path.")
    key = load_identity(identity)
    trusted = read_roster(roster)
    sid = trusted.site_id(name)
    mine, listed = identity_fingerprint(key), trusted.entries[sid - 1].fingerprint
    if mine != listed:
        raise RosterError(f"Your identity key does not match the roster's entry for {name} (fingerprint {mine} vs "
                          f"{listed}); ask the coordinator to register your {name}.identity.pem.pub "
                          "(`fedeeg site register`) and send the new roster, or set [deployment] identity_key to "
                          f"the key that was registered (roster: {roster}).")
    return key, trusted.public_keys(), sid


__all__ = ["NODE_NAME", "NODE_IDENTITY", "NODE_ROSTER", "RosterError", "RosterEntry", "Roster", "identity_fingerprint",
           "roster_digest", "roster_from_registry", "write_roster", "read_roster", "registry_public_keys",
           "load_site_keys"]
