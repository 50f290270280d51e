"""HTTPS for clients on the local stack (`infergate up --tls`), through a real Envoy: a client
that trusts the stack's CA is served end to end (picker → simulator pod) over HTTP/1.1 and,
by ALPN, HTTP/2, as is the openai client given SSL_CERT_FILE; a client without the CA fails
its verification; plain HTTP to the TLS port is disconnected at once, and HTTPS is unharmed."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys

import pytest
import requests

from infergw.stack.gateway_tls import stack_cert
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow

BODY = {"model": "infergate-sim", "prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("https")
    cert = stack_cert(workdir / "gateway-tls", "127.0.0.1")
    stack = make_stack(workdir, pods=2, listener_tls=cert.listener)
    try:
        yield stack, cert.ca_file
    finally:
        stack.stop()


def test_a_client_trusting_the_ca_is_served_by_a_picked_pod(https) -> None:
    stack, ca = https
    assert stack.url.startswith("https://127.0.0.1:")
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        url = stack.url.replace("127.0.0.1", host) + "/v1/completions"
        r = requests.post(url, json=BODY, verify=str(ca), timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-destination-endpoint-served"] in stack.pod_addresses
        assert r.json()["choices"][0]["text"]


def test_alpn_offers_h2_and_tls_1_2_is_enough(https) -> None:
    stack, ca = https
    port = stack.cfg.ports.envoy
    for alpn, most, expected in (
        (["h2", "http/1.1"], ssl.TLSVersion.MAXIMUM_SUPPORTED, "h2"),
        (["http/1.1"], ssl.TLSVersion.TLSv1_2, "http/1.1"),
    ):
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.maximum_version = most
        ctx.set_alpn_protocols(alpn)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == expected
                if most == ssl.TLSVersion.TLSv1_2:
                    assert tls.version() == "TLSv1.2"


def test_the_openai_client_trusts_the_ca_through_ssl_cert_file(https) -> None:
    """What `infergate up --tls` prints for Python clients, in a fresh interpreter."""
    stack, ca = https
    code = (
        "import openai; c = openai.OpenAI(base_url=%r, api_key='none', max_retries=0); "
        "print(c.completions.create(model='infergate-sim', prompt='hi', max_tokens=2)"
        ".usage.completion_tokens)" % (stack.url + "/v1")
    )
    env = {**os.environ, "SSL_CERT_FILE": str(ca), "REQUESTS_CA_BUNDLE": str(ca)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 1 <= int(done.stdout.strip()) <= 2


def test_without_the_ca_the_client_refuses_the_gateway(https) -> None:
    stack, _ = https
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.post(stack.url + "/v1/completions", json=BODY, timeout=30)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", stack.cfg.ports.envoy, context=ssl.create_default_context(), timeout=30
        )
        try:
            conn.request("GET", "/v1/models")
        finally:
            conn.close()


def test_plain_http_to_the_tls_port_is_disconnected_and_https_goes_on(https) -> None:
    stack, ca = https
    conn = http.client.HTTPConnection("127.0.0.1", stack.cfg.ports.envoy, timeout=30)
    try:
        # Envoy reads the request as a bad TLS record and closes: a disconnect (reset, broken
        # pipe or no answer, as the timing falls), never a hang (TimeoutError is no
        # ConnectionError) nor an answer.
        with pytest.raises(ConnectionError):
            conn.request("POST", "/v1/completions", body=b"{}", headers={"x": "y"})
            conn.getresponse()
    finally:
        conn.close()
    r = requests.post(stack.url + "/v1/completions", json=BODY, verify=str(ca), timeout=60)
    assert r.status_code == 200, r.text
