"""TLS for every listener: the server context, and the self-signed certificate of the
dev profile.

Policy (DESIGN.md §4; Mozilla "intermediate" minus the DHE suites): TLS 1.2 and 1.3 only;
on 1.2 only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3
suites are all AEAD with (EC)DHE. No compression (CRIME), no renegotiation.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
DEV_CERT_VALIDITY = timedelta(days=365)


class TLSMaterialError(Exception):
    """The certificate or key cannot be used; the message names the file, not its content."""


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """An SSL context for a server socket following the policy above."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    # Key exchange on P-256 only. Mozilla "intermediate" allows X25519, P-256 and P-384;
    # OpenSSL's default list adds X448 and P-521. Python 3.11's ssl can set one group, not
    # a list, so we pick the one every client supports.
    context.set_ecdh_curve("prime256v1")
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        msg = f"cannot load TLS certificate {cert_file} with key {key_file}: {exc}"
        raise TLSMaterialError(msg) from None
    return context


def generate_self_signed(cert_file: Path, key_file: Path, now: datetime) -> None:
    """Write a P-256 key (0600) and a self-signed certificate for localhost, for dev only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phivault dev (self-signed)")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + DEV_CERT_VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Key identifiers let strict path validators (RFC 5280 §4.2.1.1-2) use the
        # certificate as its own trust anchor.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(
        key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(cert_file, certificate.public_bytes(serialization.Encoding.PEM))


def _write_private(path: Path, content: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What the guardrails need to know about the server certificate."""

    self_signed: bool
    not_valid_before: datetime
    not_valid_after: datetime
    subject: str


def inspect_certificate(cert_file: Path) -> CertificateFacts:
    """Read the first certificate of a PEM chain."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        msg = f"cannot read certificate {cert_file}: {exc}"
        raise TLSMaterialError(msg) from None
    return CertificateFacts(
        self_signed=_is_self_signed(certificate),
        not_valid_before=certificate.not_valid_before_utc,
        not_valid_after=certificate.not_valid_after_utc,
        subject=certificate.subject.rfc4514_string(),
    )


def _is_self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
