"""Keys, signatures and authenticated encryption of the secure-aggregation protocol.

- Long-term identity: one Ed25519 key per site. It signs the site's per-round
  key advertisement, so that neither the coordinator nor anyone on the path can
  substitute a key of their own. :func:`save_identity` / :func:`load_identity`
  keep it in a PEM file readable by its owner only (0600).
- Per-round keys: two X25519 key pairs per site and round, ``c`` (to encrypt the
  Shamir shares sent to a neighbour) and ``s`` (to agree on the pairwise mask
  seed with a neighbour), as in Bonawitz et al. (CCS 2017).
- Symmetric keys come from the X25519 shared secrets through HKDF-SHA256 with a
  context string (:func:`hkdf`); shares travel under ChaCha20-Poly1305
  (:func:`seal` / :func:`open_sealed`), so the coordinator only relays
  ciphertext it cannot read or alter unnoticed.

Everything here is Flower-free and uses :mod:`cryptography` only.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

#: Domain-separation prefix of every signature, HKDF context and AEAD associated data.
DOMAIN = b"fedeeg-secagg-v1"
#: Bytes of a raw X25519 / Ed25519 public key.
KEY_BYTES = 32
NONCE_BYTES = 12


class SignatureError(ValueError):
    """A key advertisement does not verify against the site's identity key (forged or altered)."""


class DecryptionError(ValueError):
    """An encrypted share failed authentication (tampered, truncated or mis-addressed)."""


# ----------------------------------------------------------------- identities
def generate_identity() -> Ed25519PrivateKey:
    """A fresh long-term Ed25519 identity key (from the operating system's CSPRNG)."""
    return Ed25519PrivateKey.generate()


def simulation_identity(seed: int, site: int) -> Ed25519PrivateKey:
    """A deterministic identity key for a simulated site.

    Derived with HKDF from the run's seed and the site's index, so every
    simulated site and the simulated coordinator agree on the roster without
    files. Anyone who knows the seed can derive it: for simulation only; a
    deployment gives each site a key of its own (:func:`generate_identity`,
    :func:`save_identity`).

    Parameters
    ----------
    seed : int
        The run's seed (>= 0).
    site : int
        The site's protocol id (>= 1).
    """
    if seed < 0 or site < 0:
        raise ValueError(f"'seed' and 'site' must be >= 0, got seed={seed!r}, site={site!r}.")
    raw = hkdf(seed.to_bytes(16, "big"), b"simulation-identity/" + site.to_bytes(8, "big"))
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey | X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key of a private or public Ed25519/X25519 key."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def identity_from_public_bytes(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != KEY_BYTES:
        raise ValueError(f"An Ed25519 public key is {KEY_BYTES} raw bytes, got {type(data).__name__} of length "
                         f"{len(data) if hasattr(data, '__len__') else '?'}.")
    return Ed25519PublicKey.from_public_bytes(bytes(data))


def save_identity(key: Ed25519PrivateKey, path: str | Path) -> Path:
    """Write an identity key to ``path`` (PEM, PKCS#8) with permissions 0600, and its public key to ``path.pub``.

    Parameters
    ----------
    key : Ed25519PrivateKey
        The site's long-term key.
    path : str | Path
        File to write; an existing file is replaced.

    Returns
    -------
    pub_path : Path
        The public key file (PEM, SubjectPublicKeyInfo), to give to the coordinator.
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"'key' must be an Ed25519PrivateKey, got {type(key).__name__}.")
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
        os.write(fd, pem)
    finally:
        os.close(fd)
    pub_path = path.with_name(path.name + ".pub")
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub_path


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    """Read an identity key written by :func:`save_identity`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    PermissionError
        The file is readable or writable by group or others (as ssh refuses
        such keys); ``chmod 600 PATH`` fixes it.
    ValueError
        The file is not an unencrypted PEM Ed25519 private key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Identity key file {path} does not exist; create one with fedeeg.secagg.save_identity.")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"Identity key file {path} is accessible by others (mode {mode:04o}); "
                              f"run `chmod 600 {path}`.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"Identity key file {path} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"Identity key file {path} holds a {type(key).__name__}, expected an Ed25519 key.")
    return key


def load_public_identity(path: str | Path) -> Ed25519PublicKey:
    """Read a site's public identity key (``.pub`` written by :func:`save_identity`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Public key file {path} does not exist.")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"Public key file {path} is not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"Public key file {path} holds a {type(key).__name__}, expected an Ed25519 key.")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``data``."""
    return key.sign(data)


def verify(public: Ed25519PublicKey | bytes, signature: bytes, data: bytes, *, what: str) -> None:
    """Check an Ed25519 signature; raise :class:`SignatureError` naming ``what`` if it does not verify."""
    try:
        pk = identity_from_public_bytes(public) if isinstance(public, (bytes, bytearray)) else public
        pk.verify(bytes(signature), data)
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError(f"{what}: the signature does not verify against the identity key (forged or altered).") from None


# ------------------------------------------------------------ per-round keys
def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption()), public_bytes(sk)


def x25519_public(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return public_bytes(X25519PrivateKey.from_private_bytes(bytes(private)))


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret of a raw private key and a peer's raw public key.

    Raises
    ------
    ValueError
        The peer key is malformed or of small order (the shared secret would be zero).
    """
    try:
        return X25519PrivateKey.from_private_bytes(bytes(private)).exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as err:
        raise ValueError(f"Invalid X25519 peer key: {err}") from None


def hkdf(secret: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 of ``secret`` under the context ``DOMAIN + info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=DOMAIN + b"/" + info).derive(bytes(secret))


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption; returns ``nonce (12 B) || ciphertext || tag (16 B)``.

    The nonce is random (96 bits from the OS); each key encrypts one message
    per round, so nonces never repeat in practice.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(bytes(key)).encrypt(nonce, bytes(plaintext), bytes(aad))


def open_sealed(key: bytes, sealed: bytes, aad: bytes, *, what: str) -> bytes:
    """Inverse of :func:`seal`; :class:`DecryptionError` naming ``what`` if authentication fails."""
    sealed = bytes(sealed)
    if len(sealed) < NONCE_BYTES + 16:
        raise DecryptionError(f"{what}: ciphertext of {len(sealed)} bytes is too short (truncated).")
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], bytes(aad))
    except InvalidTag:
        raise DecryptionError(f"{what}: the ciphertext failed authentication (tampered, truncated or mis-addressed).") from None


__all__ = [
    "DOMAIN", "SignatureError", "DecryptionError", "generate_identity", "simulation_identity", "public_bytes",
    "identity_from_public_bytes", "save_identity", "load_identity", "load_public_identity", "sign", "verify",
    "x25519_keypair", "x25519_public", "agree", "hkdf", "seal", "open_sealed",
]
