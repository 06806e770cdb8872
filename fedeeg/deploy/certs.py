"""The consortium's certificate authority and the coordinator's TLS certificate.

``fedeeg certs init`` makes a self-signed CA (``ca.pem``/``ca.key``) and a
server certificate (``server.pem``/``server.key``) signed by it, valid for the
coordinator's host names and IP addresses. Sites receive ``ca.pem`` only, to
check that they talk to the coordinator; private keys are written 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import write_private

logger = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"


@dataclass(frozen=True)
class CertPaths:
    """The files of a certificate folder."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, folder: str | os.PathLike) -> "CertPaths":
        folder = Path(folder)
        return cls(folder / CA_CERT, folder / CA_KEY, folder / SERVER_CERT, folder / SERVER_KEY)

    def check(self) -> "CertPaths":
        """Raise FileNotFoundError naming the missing files (what the server needs to start with TLS)."""
        missing = [str(p) for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"TLS files missing: {missing}. Create them with `fedeeg certs init --out {self.ca_cert.parent} "
                "--host HOSTNAME` (or start with --insecure for a local test only)."
            )
        return self


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_certs(
    out_dir: str | os.PathLike,
    *,
    hosts: tuple[str, ...] | list[str] = ("localhost", "127.0.0.1"),
    consortium: str = "FedEEG consortium",
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Create a consortium CA and a server certificate for ``hosts``.

    Parameters
    ----------
    out_dir : path-like
        Folder to write ``ca.pem``, ``ca.key`` (0600), ``server.pem`` and
        ``server.key`` (0600) to.
    hosts : sequence of str
        The coordinator's DNS names and IP addresses, as sites will dial them
        (the certificate's subject alternative names).
    consortium : str
        The CA's common name.
    days : int
        Validity of both certificates.
    overwrite : bool
        Replace existing files (a new CA: every site needs the new ``ca.pem``).

    Returns
    -------
    paths : CertPaths
    """
    hosts = [str(h).strip() for h in hosts if str(h).strip()]
    if not hosts:
        raise ValueError("'hosts' must name at least one host name or IP address the sites will dial (--host).")
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"'days' must be a positive integer, got {days!r} instead.")
    paths = CertPaths.in_dir(out_dir)
    existing = [str(p) for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist already; pass overwrite=True (--force) to make a new CA, after which "
                              "every site needs the new ca.pem.")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, consortium),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium)])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium)]))
        .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_private(paths.ca_key, _key_pem(ca_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths.server_key, _key_pem(srv_key))
    paths.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("CA and server certificate for %s written to %s", ", ".join(hosts), out_dir)
    return paths


def certificate_hosts(cert_path: str | os.PathLike) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)]


__all__ = ["CertPaths", "init_certs", "certificate_hosts", "CA_CERT", "CA_KEY", "SERVER_CERT", "SERVER_KEY"]
