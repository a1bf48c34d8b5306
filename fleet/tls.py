"""Self-signed certificates for an endpoint that has no name of the admin's own.

``bootstrap_aws up`` without ``--certificate-arn`` makes one for the load balancer's DNS
name and imports it into ACM; clients then trust exactly that certificate for that
endpoint (pinning, see ``gui/client/``). The private key exists only in memory here
and in ACM: it is never written to disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

# ACM refuses to import a certificate that is not yet valid; a little slack covers clock
# skew between this machine and AWS.
_BACKDATE = dt.timedelta(minutes=10)
DEFAULT_VALID_DAYS = 397  # what browsers accept for a leaf; renewed by `up` before it ends
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class SelfSigned:
    certificate_pem: str
    private_key_pem: str


def self_signed_certificate(names: tuple[str, ...], *, days: int = DEFAULT_VALID_DAYS,
                            now: dt.datetime | None = None) -> SelfSigned:
    """A self-signed ECDSA P-256 certificate whose subject alternative names are
    ``names`` (DNS names, or IP addresses for tests on loopback); the first is also the
    common name. It is its own CA (``BasicConstraints(ca=True)``) so that a TLS client can
    use it as the one trust anchor (``ssl.create_default_context(cadata=PEM)``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise ValueError("a certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ImageFleet")])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    start = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return SelfSigned(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode(),
    )


@dataclass(frozen=True)
class CertificateInfo:
    names: tuple[str, ...]
    not_after: dt.datetime


def certificate_info(pem: str) -> CertificateInfo:
    """The DNS/IP names and the end of validity of a PEM certificate."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(names, cert.not_valid_after_utc)


def needs_new_certificate(pem: str | None, name: str, now: dt.datetime) -> bool:
    """Pure decision for `up`: keep a certificate that covers ``name`` and is valid for a
    while yet; otherwise make a new one."""
    if not pem:
        return True
    info = certificate_info(pem)
    return name not in info.names or info.not_after - now < RENEW_BEFORE
