"""Certificates of our in-cluster servers (the admission webhook, the picker's ext_proc port).

In a cluster a server's certificate comes from a Secret (cert-manager's, mounted as a directory
with tls.crt and tls.key) and its client trusts the issuing CA (the API server through the
webhook's caBundle, Envoy through a BackendTLSPolicy). Without one a server makes its own:
- `serving_cert`: a throwaway CA and a certificate it signs. A client that is given the CA can
  verify the server (the local stack's Envoy verifies the picker this way).
- `self_signed`: one self-signed certificate, as the reference picker makes at start; only a
  client that does not verify (or trusts exactly this certificate) accepts it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"  # a TLS Secret's keys


class CertAndKey(NamedTuple):
    """PEM bytes of a certificate and its key, by name (gRPC wants them as (key, cert))."""

    cert: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class ServingCert:
    """PEM bytes: the CA to trust, and the certificate chain and key to serve with."""

    ca: bytes
    cert: bytes
    key: bytes

    def write(self, directory: Path) -> Path:
        """ca.crt, tls.crt and tls.key, as a cert-manager Secret mounts them."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_FILE).write_bytes(self.ca)
        (directory / CERT_FILE).write_bytes(self.cert)
        key = directory / KEY_FILE
        key.write_bytes(self.key)
        key.chmod(0o600)
        return directory


def serving_cert(
    hosts: tuple[str, ...], common_name: str = "infergate", days: int = 365
) -> ServingCert:
    """A fresh CA and a certificate for `hosts` (DNS names or IP addresses) signed by it."""
    start, end = _validity(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name}-ca")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = _sign(
        _builder(ca_name, ca_name, ca_key, start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(ca_ski, critical=False),
        ca_key,
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(
        _builder(_name(common_name), ca_name, key, start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False),
        ca_key,
    )
    return ServingCert(ca=_pem(ca), cert=_pem(cert), key=_key_pem(key))


def self_signed(common_name: str = "infergate-epp", days: int = 365) -> CertAndKey:
    """A self-signed certificate for localhost, 127.0.0.1 and `common_name`, and its key."""
    start, end = _validity(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    hosts = ("localhost", common_name, "127.0.0.1")
    cert = _sign(
        _builder(name, name, key, start, end).add_extension(
            x509.SubjectAlternativeName(_alt_names(hosts)), critical=False
        ),
        key,
    )
    return CertAndKey(cert=_pem(cert), key=_key_pem(key))


def cert_files(directory: Path) -> tuple[Path, Path]:
    """(tls.crt, tls.key) in `directory`; FileNotFoundError names what is missing."""
    crt, key = directory / CERT_FILE, directory / KEY_FILE
    missing = [p.name for p in (crt, key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cert dir {directory} has no {' or '.join(missing)}")
    return crt, key


def read_cert_dir(directory: Path) -> CertAndKey:
    """The PEM bytes of tls.crt and tls.key in `directory` (see cert_files for what is missing)."""
    crt, key = cert_files(directory)
    return CertAndKey(cert=crt.read_bytes(), key=key.read_bytes())


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """From five minutes ago (clocks differ a little) to `days` from now."""
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


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


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.CertificateBuilder:
    """What every certificate here has: names, the subject's public key, serial and validity."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _key_usage(
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """KeyUsage with only the given bits set (the others are never wanted here)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(builder: x509.CertificateBuilder, signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
