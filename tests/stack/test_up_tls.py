"""`infergate up --tls` twice on one work directory: the first start finds an expired
certificate there and makes a new one, the second reuses it; both serve the README's request
over HTTPS to a client given the printed CA, and print how clients trust it."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from infergw.api.lifetime import spawn
from infergw.cluster.certs import ServingCert, serving_cert
from infergw.stack.gateway_tls import certificate_hosts
from infergw.stack.readiness import wait_http
from tests.default_ports import DEFAULT_PORTS, ports_free

DEV_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml
URL = "https://127.0.0.1:8080/v1/chat/completions"
BODY = {"model": "infergate-sim", "messages": [{"role": "user", "content": "hi"}]}


def up_once(workdir: Path) -> str:
    """Start `infergate up --tls`, ask it once with the CA it prints, stop it; its output."""
    proc = spawn(
        [sys.executable, "-m", "infergw.cli", "up", "--tls", "--pods", "1", "--workdir", workdir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http("http://127.0.0.1:9901/ready", 90, proc)
        ca = workdir / "gateway-tls" / "ca.crt"
        headers = {"authorization": f"Bearer {DEV_KEY}"}
        r = requests.post(URL, json=BODY, headers=headers, verify=str(ca), timeout=60)
        assert r.status_code == 200, r.text
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_up_tls_makes_a_certificate_for_an_expired_one_and_reuses_it_next_time(tmp_path):
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    tls_dir = tmp_path / "gateway-tls"
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    expired = serving_cert(certificate_hosts("127.0.0.1"), now=long_ago)
    expired.write(tls_dir)

    first = up_once(tmp_path)
    ca = tls_dir / "ca.crt"
    made = ServingCert.read(tls_dir)
    assert made.ca != expired.ca
    assert "Envoy on https://127.0.0.1:8080" in first, first
    assert f"clients trust the CA {ca} (made now: it expired on" in first, first
    assert f"curl --cacert {ca} https://127.0.0.1:8080/v1/chat/completions" in first, first
    assert f"SSL_CERT_FILE={ca} REQUESTS_CA_BUNDLE={ca}" in first, first

    second = up_once(tmp_path)
    assert f"clients trust the CA {ca} (reused)" in second, second
    assert ServingCert.read(tls_dir) == made
