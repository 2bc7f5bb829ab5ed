"""A throw-away certificate authority for test servers, built with ``cryptography``.

Typical use::

    ca = ThrowawayCA.create(tmp_path / "ca")
    good = ca.issue_server(["svpn.test"])          # what Prosody should serve
    wrong = ca.issue_wrong_name()                  # valid chain, wrong host name
    rogue = unknown_ca_server_cert(tmp_path / "rogue", ["svpn.test"])  # chain clients lack
    ctx = ca.client_context()                      # verifying ssl.SSLContext for clients

Keys are ECDSA P-256 (fast to make). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FOR = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one issued certificate."""

    cert: Path  # leaf certificate (PEM)
    key: Path  # its private key (PEM, 0600)
    ca_file: Path  # certificate of the CA that signed it (PEM)
    names: tuple[str, ...]  # DNS names (and IP addresses) in its subjectAltName


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _stem(names: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", names[0]) if names else "server"


class ThrowawayCA:
    """A self-signed CA whose key lives in ``directory``; issues server certificates.

    Named so that pytest does not try to collect it as a test class.
    """

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
    ) -> None:
        self.directory = directory
        self._key = key
        self.cert = cert
        self.ca_file = directory / "ca.pem"
        self.key_file = directory / "ca.key"

    @classmethod
    def create(cls, directory: Path | str, common_name: str = "SocialVPN Test CA") -> ThrowawayCA:
        """Make a new CA; write ``ca.pem`` and ``ca.key`` (0600) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, key, cert)
        _write_public(ca.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(ca.key_file, _key_pem(key))
        return ca

    def issue_server(
        self,
        names: Sequence[str],
        *,
        stem: str | None = None,
        directory: Path | str | None = None,
        valid_for: dt.timedelta = _VALID_FOR,
        not_before: dt.datetime | None = None,
    ) -> CertFiles:
        """Issue a server certificate whose subjectAltName lists ``names``.

        Names that parse as IP addresses go in as IP entries, the rest as DNS names. Files are
        ``<stem>.crt`` and ``<stem>.key`` in ``directory`` (default: the CA's directory).
        Pass a past ``not_before`` with a short ``valid_for`` for an expired certificate.
        """
        if not names:
            raise ValueError("a server certificate needs at least one name")
        out = Path(directory) if directory is not None else self.directory
        stem = stem or _stem(names)
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or (dt.datetime.now(dt.UTC) - _BACKDATE)
        issuer_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        files = CertFiles(
            cert=out / f"{stem}.crt",
            key=out / f"{stem}.key",
            ca_file=self.ca_file,
            names=tuple(names),
        )
        _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(files.key, _key_pem(key))
        return files

    def issue_wrong_name(
        self, wrong_name: str = "wrong-name.invalid", *, directory: Path | str | None = None
    ) -> CertFiles:
        """A certificate from this (trusted) CA for a name clients do not ask for."""
        return self.issue_server([wrong_name], stem=f"wrongname-{wrong_name}", directory=directory)

    def client_context(self) -> ssl.SSLContext:
        """A client ``SSLContext`` that trusts only this CA and checks the host name."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def unknown_ca_server_cert(directory: Path | str, names: Sequence[str]) -> CertFiles:
    """A server certificate for the right ``names`` from a second CA clients never see.

    The rogue CA lives in ``directory`` too (``ca.pem``), so a test can still inspect it, but
    it is never handed to clients: verification must fail with "unable to get local issuer".
    """
    rogue = ThrowawayCA.create(directory, common_name="Unknown Rogue CA")
    return rogue.issue_server(names, stem=f"unknownca-{_stem(names)}")
