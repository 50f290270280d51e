"""`infergate up` on its default ports: the quickstart Model → controllers → simulator pods,
Envoy (checking the quickstart's API keys) → picker → those pods, all stopped by SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from infergw.api.lifetime import spawn
from infergw.stack.readiness import wait_http
from tests.default_ports import DEFAULT_PORTS, ports_free

DEV_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml, what the banner shows


@pytest.mark.slow
def test_up_serves_the_readme_request_and_stops_on_sigint(tmp_path):
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    proc = spawn(
        [sys.executable, "-m", "infergw.cli", "up", "--pods", "2", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http("http://127.0.0.1:9901/ready", 90, proc)
        # the request the README shows, through Envoy on 8080: 401 without the dev API key
        url = "http://127.0.0.1:8080/v1/chat/completions"
        body = {"model": "infergate-sim", "messages": [{"role": "user", "content": "hi"}]}
        assert requests.post(url, json=body, timeout=60).status_code == 401
        r = requests.post(
            url, json=body, headers={"authorization": f"Bearer {DEV_KEY}"}, timeout=60
        )
        assert r.status_code == 200, r.text
        served = r.headers["x-gateway-destination-endpoint-served"]
        host, port = served.rsplit(":", 1)
        assert host.startswith("127.0.0.") and port == "8000", served
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        import openai

        client = openai.OpenAI(base_url="http://localhost:8080/v1", api_key=DEV_KEY)
        chat = client.chat.completions.create(
            model="infergate-sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.usage.completion_tokens <= 4
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Envoy on http://127.0.0.1:8080" in out
        assert "2 pods serving 'infergate-sim'" in out, out
        assert f"-H 'authorization: Bearer {DEV_KEY}'" in out, out  # how to call it
        for address in ("127.0.0.1:8080", "127.0.0.1:9002", served):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{address}/", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_ctrl_c_while_starting_stops_everything_started(tmp_path):
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    example = tmp_path / "example"
    example.mkdir()
    model = {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "stuck"},
        "spec": {
            "modelURI": "hf://org/never",
            "image": "x",
            "replicas": 1,
            "backend": {"aggregated": {}},
            # the simulator, which exits at an unknown flag: never ready
            "engine": {"type": "Simulator", "args": ["--definitely-not-a-flag"]},
        },
    }
    import yaml

    (example / "model.yaml").write_text(yaml.safe_dump(model))
    proc = spawn(
        [
            sys.executable,
            "-m",
            "infergw.cli",
            "up",
            "--workdir",
            str(tmp_path / "w"),
            str(example),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http("http://127.0.0.1:9091/metrics", 60, proc)  # the controllers are up
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)  # not the 120 s the start would wait
        assert proc.returncode == 130, out
        with pytest.raises(requests.ConnectionError):
            requests.get("http://127.0.0.1:9091/metrics", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
