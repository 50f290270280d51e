"""Envoy's retries in front of the pods, through a real Envoy as the local template renders
it: a pod that answers 503 (draining, out of room) costs the client nothing while the picker
named a fallback, the ModelServer's retry.attempts caps how many, and the conditions are the
cluster manifests' too (api/retries.py; tests/test_manifests.py checks the patch)."""

from __future__ import annotations

import sys
import time

import pytest
import requests
import yaml

from tests.e2e.gateway_config import PIN, SERVED
from tests.e2e.recording_backend import MODEL
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow
NET = "networking.infergate.io/v1alpha1"
ASKS = 24


@pytest.fixture
def draining(tmp_path):
    """Two pods: the first turns every request away with 503, the second answers."""
    ports: list[int] = []

    def command(port: int) -> list[str]:
        ports.append(port)
        backend = "unavailable_backend" if len(ports) == 1 else "recording_backend"
        return [sys.executable, "-m", f"tests.e2e.{backend}", str(port)]

    stack = make_stack(tmp_path, pods=2, pod_command=command)
    yield stack, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    stack.stop()


def ask(stack, model: str, i: int, both: str) -> requests.Response:
    # A new prompt each time: no prefix steers the picker away from the pod that failed.
    return requests.post(
        stack.url + "/v1/completions",
        json={"model": model, "prompt": f"question {i}", "max_tokens": 1},
        headers={PIN: both},
        timeout=30,
    )


def turned_away(address: str) -> int:
    return requests.get(f"http://{address}/turned-away", timeout=5).json()


def test_a_503_from_the_pod_goes_to_the_pickers_fallback(draining):
    stack, bad, good = draining
    answers = [ask(stack, MODEL, i, f"{bad},{good}") for i in range(ASKS)]
    assert [r.status_code for r in answers] == [200] * ASKS, [r.text for r in answers]
    assert {r.headers[SERVED] for r in answers} == {good}
    assert turned_away(bad) > 0  # it was the primary, and the client never saw its 503


def test_a_model_server_with_no_retry_attempts_passes_the_503_on(draining):
    stack, bad, good = draining
    server = {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": "once", "namespace": "default"},
        "spec": {
            "model": MODEL,
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": "quickstart-sim"}},
            "trafficPolicy": {"retry": {"attempts": 0}},
        },
    }
    route = {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": "once", "namespace": "default"},
        "spec": {"modelName": "once", "rules": [{"targetModels": [{"modelServerName": "once"}]}]},
    }
    with stack.pool_path.open("a") as f:  # the picker reloads its pool file on change
        f.write("---\n" + yaml.safe_dump_all([server, route]))
    deadline = time.monotonic() + 10
    while ask(stack, "once", -1, good).status_code != 200:
        assert time.monotonic() < deadline, "the picker never loaded the route"
        time.sleep(0.2)
    before = turned_away(bad)
    answers = [ask(stack, "once", i, f"{bad},{good}") for i in range(ASKS)]
    passed_on = [r for r in answers if r.status_code == 503]
    # Each time the pod that turns requests away was the primary, its 503 reached the client.
    assert len(passed_on) == turned_away(bad) - before > 0
    assert all(r.json()["error"]["message"] == "draining" for r in passed_on)
    assert {r.headers[SERVED] for r in answers if r.status_code == 200} == {good}
