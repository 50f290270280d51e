"""`infergate up`: a fleet of simulator pods that answer, publish KV events and stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import zmq

from infergate.readiness import wait_http
from tests.conftest import free_port


def free_port_run(n: int) -> int:
    """A base port with n free ports after it."""
    for _ in range(50):
        base = free_port()
        if base + n < 65535 and all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_up_starts_pods_that_answer_and_stop_on_sigint():
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    events_port = free_port()
    sub.bind(f"tcp://127.0.0.1:{events_port}")
    base = free_port_run(2)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infergate.cli",
            "up",
            "--pods",
            "2",
            "--base-port",
            str(base),
            "--kv-events-endpoint",
            f"tcp://127.0.0.1:{events_port}",
            "--",
            "--sim-time-scale",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for i in range(2):
            wait_http(f"http://127.0.0.1:{base + i}/health", 60, proc)
        topics = set()
        deadline = time.monotonic() + 20
        attempt = 0
        while len(topics) < 2 and time.monotonic() < deadline:
            # Touch the SUB so ZMQ attaches the pods' connections (see Subscriber in
            # test_simulator_kv_events), and send new prompts: a cached one stores nothing.
            sub.poll(100)
            attempt += 1
            for i in range(2):
                content = f"attempt {attempt}: " + "hi " * 40
                r = requests.post(
                    f"http://127.0.0.1:{base + i}/v1/chat/completions",
                    json={
                        "model": "infergate-sim",
                        "messages": [{"role": "user", "content": content}],
                    },
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                # answers end by themselves (EOS), not at max_model_len
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            while sub.poll(200):
                topics.add(sub.recv_multipart()[0])
        assert topics == {f"kv@127.0.0.1:{base + i}@infergate-sim".encode() for i in range(2)}
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "2 simulator pods" in out
        for i in range(2):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{base + i}/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sub.close(0)
        ctx.term()
