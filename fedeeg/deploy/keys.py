"""A site's keys: the node-authentication key and the secure-aggregation identity key.

``fedeeg site new NAME`` writes, in the site's key folder,

- ``NAME.key`` / ``NAME.pub``: an EC P-384 key pair in OpenSSH format, the form
  Flower's SuperNode authentication takes (``--auth-supernode-private-key``;
  the coordinator registers ``NAME.pub`` with ``fedeeg site register``);
- ``NAME.identity.pem`` / ``NAME.identity.pem.pub``: the site's long-term Ed25519
  identity key that signs its secure-aggregation key advertisements
  (:func:`fedeeg.secagg.keys.save_identity`).

Private keys are created 0600 and never leave the site; only the ``.pub``
files go to the coordinator.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import check_private, check_site_name, write_private

logger = logging.getLogger(__name__)

#: The OpenSSH key type of node-authentication keys.
NODE_KEY_TYPE = "ecdsa-sha2-nistp384"


@dataclass(frozen=True)
class SiteKeys:
    """The key files of one site."""

    name: str
    node_key: Path
    node_pub: Path
    identity_key: Path
    identity_pub: Path

    @classmethod
    def in_dir(cls, folder: str | os.PathLike, name: str) -> "SiteKeys":
        folder = Path(folder)
        return cls(name, folder / f"{name}.key", folder / f"{name}.pub", folder / f"{name}.identity.pem",
                   folder / f"{name}.identity.pem.pub")


def _save_identity(path: Path) -> Path:
    try:  # the secure-aggregation module owns the identity key's format
        from ..secagg.keys import generate_identity, save_identity
    except ImportError:  # pragma: no cover - fedeeg.secagg ships with this version
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        pub = path.with_name(path.name + ".pub")
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        return pub
    return save_identity(generate_identity(), path)


def new_site_keys(name: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> SiteKeys:
    """Create a site's node-authentication and identity keys.

    Parameters
    ----------
    name : str
        The site's name (see :func:`fedeeg.deploy.check_site_name`).
    out_dir : path-like
        The site's key folder (created 0700 if missing).
    overwrite : bool
        Replace existing keys (the coordinator must then register the new
        public key, and revoke the old one).

    Returns
    -------
    keys : SiteKeys
    """
    check_site_name(name)
    keys = SiteKeys.in_dir(out_dir, name)
    existing = [str(p) for p in (keys.node_key, keys.identity_key) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist already; pass overwrite=True (--force) to make new keys, which the "
                              "coordinator must then register again.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(keys.node_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.node_pub.write_bytes(pub + f" fedeeg-site:{name}\n".encode())
    _save_identity(keys.identity_key)
    logger.info("keys of site %s written to %s", name, folder)
    return keys


def read_node_public_key(path: str | os.PathLike) -> tuple[str, str]:
    """Read and check a site's node-authentication public key file.

    Returns
    -------
    key : str
        ``"ecdsa-sha2-nistp384 AAAA..."`` (type and base64 blob, no comment).
    comment : str
        The comment (``fedeeg-site:NAME`` for keys made by ``fedeeg site new``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Public key {str(path)!r} not found.")
    text = path.read_text().strip()
    if "PRIVATE KEY" in text:
        raise ValueError(f"{path} holds a PRIVATE key; register the site's .pub file, and keep the private key at the site.")
    parts = text.split()
    if len(parts) < 2 or parts[0] != NODE_KEY_TYPE:
        raise ValueError(f"{path} is not an OpenSSH {NODE_KEY_TYPE} public key (made by `fedeeg site new NAME`), "
                         f"got {text[:40]!r}...")
    try:
        serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except ValueError as err:
        raise ValueError(f"{path}: the public key does not parse ({err}).") from None
    return f"{parts[0]} {parts[1]}", " ".join(parts[2:])


def fingerprint(public_key: str) -> str:
    """OpenSSH-style fingerprint ``SHA256:...`` of ``"TYPE BASE64"``."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_node_private_key(path: str | os.PathLike):
    """Load a node-authentication private key after checking its permissions (0600)."""
    path = check_private(path)
    return serialization.load_ssh_private_key(path.read_bytes(), password=None)


__all__ = ["SiteKeys", "NODE_KEY_TYPE", "new_site_keys", "read_node_public_key", "fingerprint", "load_node_private_key"]
