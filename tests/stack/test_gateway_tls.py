"""stack/gateway_tls.py: the HTTPS listener's certificate for `infergate up --tls` — made for
the names clients dial, kept in its directory across starts, made again when those names
change; a certificate the user brings is checked, never replaced."""

from __future__ import annotations

import datetime
import socket

import pytest

from infergw.cluster import certs
from infergw.stack import gateway_tls
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import StackPorts


def test_the_certificate_names_loopback_and_the_listen_address() -> None:
    assert gateway_tls.certificate_hosts("127.0.0.1") == ("127.0.0.1", "localhost")
    assert gateway_tls.certificate_hosts("10.1.2.3") == ("127.0.0.1", "localhost", "10.1.2.3")
    everywhere = gateway_tls.certificate_hosts("0.0.0.0")
    assert socket.gethostname() in everywhere and "0.0.0.0" not in everywhere
    assert {"::1", socket.gethostname()} <= set(gateway_tls.certificate_hosts("::"))


def test_it_lives_in_the_workdir_or_the_users_state_directory(tmp_path, monkeypatch) -> None:
    assert gateway_tls.default_directory(tmp_path) == tmp_path / "gateway-tls"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert gateway_tls.default_directory(None) == tmp_path / "state" / "infergate" / "gateway-tls"


def test_kept_across_starts_and_made_again_for_other_names(tmp_path) -> None:
    first = gateway_tls.stack_cert(tmp_path / "tls", "127.0.0.1")
    assert first.made_because == "none was stored"
    assert (tmp_path / "tls").stat().st_mode & 0o077 == 0
    ca = first.ca_file.read_bytes()
    again = gateway_tls.stack_cert(tmp_path / "tls", "127.0.0.1")
    assert again.made_because is None and again.ca_file.read_bytes() == ca
    moved = gateway_tls.stack_cert(tmp_path / "tls", "10.1.2.3")
    assert "not 10.1.2.3, 127.0.0.1, localhost" in moved.made_because
    assert moved.ca_file.read_bytes() != ca


def write(tmp_path, made: certs.ServingCert, key: bytes | None = None):
    crt, k = tmp_path / "mine.crt", tmp_path / "mine.key"
    crt.write_bytes(made.cert)
    k.write_bytes(made.key if key is None else key)
    return crt, k


def test_your_own_certificate_is_served_as_it_is(tmp_path) -> None:
    crt, key = write(tmp_path, certs.serving_cert(("gateway.example",)))
    mine = gateway_tls.own_cert(crt, key)
    assert (mine.listener.cert_file, mine.listener.key_file) == (crt, key)
    assert mine.ca_file is None and mine.made_because is None


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "No such file"),
        ("foreign key", "not the certificate's key"),
        ("expired", "expired on"),
        ("not pem", "not a PEM certificate"),
    ],
)
def test_your_own_certificate_is_refused_saying_why(tmp_path, breakage, message) -> None:
    made = certs.serving_cert(("gateway.example",))
    crt, key = write(tmp_path, made)
    if breakage == "missing":
        key.unlink()
    elif breakage == "foreign key":
        key.write_bytes(certs.serving_cert(("gateway.example",)).key)
    elif breakage == "expired":
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        crt, key = write(tmp_path, certs.serving_cert(("gateway.example",), days=1, now=long_ago))
    else:
        crt.write_text("hello")
    with pytest.raises(ValueError, match=message):
        gateway_tls.own_cert(crt, key)


@pytest.mark.parametrize(
    ("host", "tls", "url"),
    [
        ("127.0.0.1", False, "http://127.0.0.1:8443"),
        ("127.0.0.1", True, "https://127.0.0.1:8443"),
        ("0.0.0.0", True, "https://127.0.0.1:8443"),
        ("::", True, "https://[::1]:8443"),
        ("10.1.2.3", False, "http://10.1.2.3:8443"),
    ],
)
def test_the_stack_says_where_its_own_clients_reach_it(tmp_path, host, tls, url) -> None:
    cert = gateway_tls.stack_cert(tmp_path / "tls", host).listener if tls else None
    cfg = StackConfig(
        workdir=tmp_path, ports=StackPorts(envoy=8443), listen_host=host, listener_tls=cert
    )
    assert LocalStack(cfg).url == url
