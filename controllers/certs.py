"""A throwaway CA and a serving certificate it signs: for the admission webhook, and for the
local stack's picker (stack/local.py; Envoy trusts the CA and verifies the picker by it).

In a cluster the certificate comes from a Secret (cert-manager's, mounted as a directory with
tls.crt and tls.key) and the API server trusts it through the webhook's caBundle. Without one
the webhook makes its own at start: the CA is what a client (or a caBundle) must trust.
The controllers do not import epp, so this does not reuse epp/tls.py.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names the API server uses to reach the webhook Service (gateway-manifests/webhook.yaml).
SERVICE_NAMES = (
    "infergate-controllers",
    "infergate-controllers.infergate-system",
    "infergate-controllers.infergate-system.svc",
    "infergate-controllers.infergate-system.svc.cluster.local",
)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", *SERVICE_NAMES)


@dataclass(frozen=True, slots=True)
class ServingCert:
    """PEM bytes: the CA to trust, and the certificate chain and key to serve with."""

    ca: bytes
    cert: bytes
    key: bytes

    def write(self, directory: Path) -> Path:
        """ca.crt, tls.crt and tls.key, as a cert-manager Secret mounts them."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_bytes(self.ca)
        (directory / "tls.crt").write_bytes(self.cert)
        key = directory / "tls.key"
        key.write_bytes(self.key)
        key.chmod(0o600)
        return directory


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def serving_cert(
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    common_name: str = "infergate-controllers",
    days: int = 365,
) -> ServingCert:
    """A fresh CA and a certificate for `hosts` (DNS names or IP addresses) signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name}-ca")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ServingCert(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_cert_dir(directory: Path) -> tuple[Path, Path]:
    """(tls.crt, tls.key) in `directory`; FileNotFoundError names what is missing."""
    crt, key = directory / "tls.crt", directory / "tls.key"
    missing = [p.name for p in (crt, key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cert dir {directory} has no {' or '.join(missing)}")
    return crt, key
