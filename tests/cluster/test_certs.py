"""cluster/certs.py: the certificates our servers make, checked by a real TLS handshake.

A client that trusts a serving certificate's CA accepts it for every host it was made for and
for no other, and a second CA's client refuses it; a self-signed certificate is accepted by a
client that trusts exactly it; a cert dir without its files is refused, naming what is missing.
A stored serving certificate is reused while it serves the same names, is signed by its CA, has
its own key and is more than 30 days from expiring; otherwise it is made again, saying why.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from infergw.cluster import certs


def handshake(cert_dir: Path, trusted: bytes, hostname: str) -> None:
    """A TLS handshake in memory: a server with cert_dir's files, a client trusting `trusted`
    and asking for `hostname`. Raises ssl.SSLCertVerificationError if the client refuses."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*certs.cert_files(cert_dir))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=trusted.decode())

    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> tuple[certs.ServingCert, Path]:
    made = certs.serving_cert(("127.0.0.1", "picker.local"), common_name="picker")
    return made, made.write(tmp_path_factory.mktemp("serving"))


@pytest.mark.parametrize("host", ["127.0.0.1", "picker.local"])
def test_a_serving_certificate_is_accepted_for_its_hosts_by_its_ca(serving, host) -> None:
    made, cert_dir = serving
    handshake(cert_dir, made.ca, host)


def test_a_serving_certificate_is_refused_for_another_host_or_by_another_ca(serving) -> None:
    made, cert_dir = serving
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(cert_dir, made.ca, "elsewhere.local")
    other_ca = certs.serving_cert(("127.0.0.1",)).ca
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(cert_dir, other_ca, "127.0.0.1")


def test_written_files_are_a_secrets_layout_and_the_key_is_private(serving) -> None:
    made, cert_dir = serving
    assert (cert_dir / "ca.crt").read_bytes() == made.ca
    assert certs.read_cert_dir(cert_dir) == (made.cert, made.key)
    assert (cert_dir / "tls.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "infergate-epp"])
def test_a_self_signed_certificate_is_accepted_by_a_client_trusting_it(tmp_path, host) -> None:
    made = certs.self_signed()
    (tmp_path / "tls.crt").write_bytes(made.cert)
    (tmp_path / "tls.key").write_bytes(made.key)
    handshake(tmp_path, made.cert, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, certs.self_signed().cert, host)


def test_a_cert_dir_without_its_files_names_what_is_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no tls\.crt or tls\.key"):
        certs.read_cert_dir(tmp_path)
    (tmp_path / "tls.crt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no tls\.key$"):
        certs.cert_files(tmp_path)


# ---- a stored certificate, kept while it still serves -------------------------------------------

HOSTS = ("127.0.0.1", "localhost")


def test_a_stored_certificate_is_reused_while_it_serves_the_same_names(tmp_path) -> None:
    first, why = certs.ensure_serving_cert(tmp_path, HOSTS)
    assert why == "none was stored"
    again, why = certs.ensure_serving_cert(tmp_path, HOSTS)
    assert why is None and again == first
    handshake(tmp_path, again.ca, "localhost")


def test_an_expired_or_expiring_certificate_is_made_again(tmp_path) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    old = certs.serving_cert(HOSTS, days=365, now=long_ago).write(tmp_path)
    expired = certs.ServingCert.read(old)
    made, why = certs.ensure_serving_cert(old, HOSTS)
    assert why is not None and why.startswith("it expired on"), why
    assert made.ca != expired.ca  # a new CA, the expired one's gone
    assert certs.ServingCert.read(tmp_path) == made  # written over the expired one
    handshake(tmp_path, made.ca, "127.0.0.1")  # and valid now
    soon = certs.serving_cert(HOSTS, days=10)
    assert certs.reuse_problem(soon, HOSTS).startswith("it expires on")
    assert certs.reuse_problem(soon, HOSTS, renew_before=datetime.timedelta(days=1)) is None


def test_other_names_a_foreign_ca_or_a_foreign_key_are_not_reused() -> None:
    stored = certs.serving_cert(HOSTS)
    assert certs.reuse_problem(stored, ("localhost", "127.0.0.1")) is None  # order is no change
    assert "not 10.0.0.7" in certs.reuse_problem(stored, (*HOSTS, "10.0.0.7"))
    other = certs.serving_cert(HOSTS)
    assert "did not sign" in certs.reuse_problem(replace(stored, ca=other.ca), HOSTS)
    assert "not the certificate's key" in certs.reuse_problem(replace(stored, key=other.key), HOSTS)
    assert "cannot be read" in certs.reuse_problem(replace(stored, cert=b"junk"), HOSTS)


def test_a_half_written_directory_is_made_again(tmp_path) -> None:
    certs.serving_cert(HOSTS).write(tmp_path)
    (tmp_path / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")
    made, why = certs.ensure_serving_cert(tmp_path, HOSTS)
    assert "key is not an unencrypted PEM private key" in why
    handshake(tmp_path, made.ca, "localhost")


def test_an_encrypted_key_is_named_not_raised() -> None:
    from cryptography.hazmat.primitives import serialization

    made = certs.serving_cert(HOSTS)
    key = serialization.load_pem_private_key(made.key, None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert "unencrypted" in certs.key_problem(made.cert, locked)
