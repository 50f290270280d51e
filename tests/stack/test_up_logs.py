"""`infergate up --log-format json -v` hands its log flags to every process it starts: the
picker's, the controllers', Envoy's and the pods' logs in the work directory are JSON lines
(each one parses), the picker's debug lines of a request carry its id, and the prompt is in
none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from infergw.api.lifetime import spawn
from infergw.stack.readiness import wait_http
from tests.default_ports import DEFAULT_PORTS, ports_free

DEV_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml
MARKER = "UP-PROMPT-MARKER-0c9d"
UP = [sys.executable, "-m", "infergw.cli", "up"]


@pytest.mark.slow
def test_up_hands_json_and_verbosity_to_every_process(tmp_path):
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_LOG")}
    work = tmp_path / "work"
    proc = spawn(
        [*UP, "--log-format", "json", "-v", "--workdir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        wait_http("http://127.0.0.1:9901/ready", 90, proc)
        r = requests.post(
            "http://127.0.0.1:8080/v1/completions",
            json={"model": "infergate-sim", "prompt": f"tell {MARKER}", "max_tokens": 4},
            headers={"authorization": f"Bearer {DEV_KEY}", "x-request-id": "up-logs-1"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The stack's own processes, Envoy (stack/envoy_logs.py), and the pods the controllers run
    # (<state>/pods/*.log).
    logs = {p.name: p.read_text() for p in work.rglob("*.log")}
    assert {"controllers.log", "envoy.log"} <= set(logs), sorted(logs)
    assert any(n.startswith("picker") for n in logs)
    assert any(n.endswith("_engine.log") for n in logs), sorted(logs)
    lines = {name: [json.loads(ln) for ln in text.splitlines()] for name, text in logs.items()}
    assert any(ln["level"] == "info" for ln in lines["envoy.log"])  # -v: Envoy at info
    picker = [ln for name, got in lines.items() if name.startswith("picker") for ln in got]
    mine = [ln for ln in picker if ln.get("request_id") == "up-logs-1"]
    assert any(ln["level"] == "debug" for ln in mine), picker  # -v reached the picker
    assert all(MARKER not in text for text in logs.values())
