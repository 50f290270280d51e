"""The ext_proc port's certificate: --cert-path's tls.crt and tls.key, else a self-signed one.

Envoy verifies the picker's certificate, so the picker is given one signed by a CA Envoy
trusts: the local stack makes that CA (stack/local.py), a cluster has cert-manager issue it
(gateway-manifests/epp-tls.yaml). The self-signed fallback, as the reference picker makes at
start, only serves a gateway that does not verify.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(common_name: str = "infergate-epp") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), valid for a year, for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName(common_name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_cert_dir(path: Path) -> tuple[bytes, bytes]:
    """tls.crt and tls.key from a directory, as a Kubernetes TLS secret mounts them."""
    crt, key = path / "tls.crt", path / "tls.key"
    if not crt.is_file() or not key.is_file():
        raise FileNotFoundError(f"--cert-path {path} must contain tls.crt and tls.key")
    return crt.read_bytes(), key.read_bytes()
