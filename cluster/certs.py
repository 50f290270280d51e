"""Certificates of our in-cluster servers (the admission webhook, the picker's ext_proc port).

In a cluster a server's certificate comes from a Secret (cert-manager's, mounted as a directory
with tls.crt and tls.key) and its client trusts the issuing CA (the API server through the
webhook's caBundle, Envoy through a BackendTLSPolicy). Without one a server makes its own:
- `serving_cert`: a throwaway CA and a certificate it signs. A client that is given the CA can
  verify the server (the local stack's Envoy verifies the picker this way).
- `self_signed`: one self-signed certificate, as the reference picker makes at start; only a
  client that does not verify (or trusts exactly this certificate) accepts it.

A server that keeps its certificate across restarts (the local gateway's HTTPS listener, whose CA
clients are given once) uses `ensure_serving_cert`: the stored one while `reuse_problem` finds
nothing wrong with it, else a new one. The CA's key is never kept: the CA signs this one
certificate and nothing else can be made with it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"  # a TLS Secret's keys
# A stored certificate is replaced once it has less left than this (cert-manager's default
# for a year-long certificate is about a third of it; a local gateway restarts far more often).
RENEW_BEFORE = datetime.timedelta(days=30)


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
        key.unlink(missing_ok=True)  # made private before a byte of the key is in it
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.key)
        return directory

    @classmethod
    def read(cls, directory: Path) -> ServingCert:
        """What `write` wrote; FileNotFoundError names what is missing."""
        crt, key = cert_files(directory)
        ca = directory / CA_FILE
        if not ca.is_file():
            raise FileNotFoundError(f"cert dir {directory} has no {CA_FILE}")
        return cls(ca=ca.read_bytes(), cert=crt.read_bytes(), key=key.read_bytes())


def serving_cert(
    hosts: tuple[str, ...],
    common_name: str = "infergate",
    days: int = 365,
    now: datetime.datetime | None = None,
) -> ServingCert:
    """A fresh CA and a certificate for `hosts` (DNS names or IP addresses) signed by it, valid
    from `now` (default: the clock's) for `days`."""
    start, end = _validity(days, now)
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


def ensure_serving_cert(
    directory: Path,
    hosts: tuple[str, ...],
    common_name: str = "infergate",
    days: int = 365,
) -> tuple[ServingCert, str | None]:
    """The serving certificate stored in `directory` if it still serves `hosts`, else a new one
    written there; with it, why it was made (None: the stored one was reused)."""
    try:
        stored = ServingCert.read(directory)
    except FileNotFoundError:
        why = "none was stored"
    else:
        why = reuse_problem(stored, hosts)
        if why is None:
            return stored, None
    made = serving_cert(hosts, common_name, days)
    made.write(directory)
    return made, why


def reuse_problem(
    stored: ServingCert,
    hosts: tuple[str, ...],
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = RENEW_BEFORE,
) -> str | None:
    """Why `stored` should not serve `hosts` any longer (expired or nearly, other names, not
    signed by its CA, a key that is not its own, unreadable), or None."""
    try:
        cert = x509.load_pem_x509_certificate(stored.cert)
        ca = x509.load_pem_x509_certificate(stored.ca)
    except ValueError as exc:
        return f"it cannot be read ({exc})"
    expiry = validity_problem(cert, now, renew_before)
    if expiry is not None:
        return f"it {expiry}"
    names, wanted = cert_names(cert), {_normal(h) for h in hosts}
    if names != wanted:
        return f"it names {', '.join(sorted(names))}, not {', '.join(sorted(wanted))}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"its {CA_FILE} did not sign it"
    problem = key_problem(stored.cert, stored.key)
    return None if problem is None else f"its {problem}"


def validity_problem(
    cert: x509.Certificate,
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = datetime.timedelta(0),
) -> str | None:
    """ "expired on …", "expires on …" (within `renew_before`), "is not valid before …", or None."""
    now = now or datetime.datetime.now(datetime.UTC)
    starts, ends = cert.not_valid_before_utc, cert.not_valid_after_utc
    if ends <= now:
        return f"expired on {ends:%Y-%m-%d %H:%M} UTC"
    if ends - renew_before <= now:
        return f"expires on {ends:%Y-%m-%d %H:%M} UTC"
    if starts > now:
        return f"is not valid before {starts:%Y-%m-%d %H:%M} UTC"
    return None


def key_problem(cert_pem: bytes, key_pem: bytes) -> str | None:
    """Why `key_pem` cannot serve `cert_pem` (not a PEM certificate, not a PEM key, another
    key than the certificate's), or None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "certificate is not a PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted, and no password given
        return f"key is not an unencrypted PEM private key ({exc})"
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        return "key is not the certificate's key"
    return None


def cert_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate's SAN holds, as `serving_cert` takes them."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    return names | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _normal(host: str) -> str:
    """`host` as cert_names spells it (an IPv6 address in its short form)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _public_der(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _validity(
    days: int, now: datetime.datetime | None = None
) -> tuple[datetime.datetime, datetime.datetime]:
    """From five minutes before `now` (clocks differ a little) to `days` after it."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


# X.509's upper bound on a common name (RFC 5280's ub-common-name): a CA named after a picker
# Service of 63 characters plus "-ca" would exceed it. Clients verify the SANs, never the CN.
COMMON_NAME_MAX = 64


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:COMMON_NAME_MAX])])


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
