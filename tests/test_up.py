"""`infergate up` on its default ports: Envoy → picker → simulator pods, stopped by SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import requests

from infergate.readiness import wait_http

DEFAULT_PORTS = (8080, 9901, 9002, 9003, 9090, 5557, 8000, 8001)


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.mark.slow
def test_up_serves_the_readme_request_and_stops_on_sigint(tmp_path):
    if not _ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "infergate.cli", "up", "--pods", "2", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http("http://127.0.0.1:9901/ready", 90, proc)
        # the request the README shows, through Envoy on 8080
        r = requests.post(
            "http://127.0.0.1:8080/v1/chat/completions",
            json={"model": "infergate-sim", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-destination-endpoint-served"] in (
            "127.0.0.1:8000",
            "127.0.0.1:8001",
        )
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        import openai

        client = openai.OpenAI(base_url="http://localhost:8080/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="infergate-sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.usage.completion_tokens <= 4
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Envoy on http://127.0.0.1:8080" in out
        for port in (8080, 9002, 8000, 8001):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
