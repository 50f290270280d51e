"""Model routing end to end through Envoy: ModelRoutes and ModelServers in the picker's pool
file send a public model name to the pods of a server (here: one simulator port each), with
the engine's model name in the request and the public one back in the answer, streamed or
not; unknown models get 404, a server without ready pods 503, and a server's timeout is
enforced by Envoy."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests
import yaml

from tests.e2e.gateway_config import MODEL, SERVED
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow
NET = "networking.infergate.io/v1alpha1"


def server(name: str, port: int, **spec) -> dict:
    return {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": MODEL,  # what the simulator serves
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": "quickstart-sim"}},
            "workloadPort": {"port": port},
            **spec,
        },
    }


def route(name: str, model: str, targets: list[dict]) -> dict:
    return {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"modelName": model, "rules": [{"name": "default", "targetModels": targets}]},
    }


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """One stack for the module: its tests only send requests (the timeout test's slow
    answer runs on the `slow` server's own pod)."""
    # a server without pods is held for one at most a second (scale from zero), then 503
    stack = make_stack(
        tmp_path_factory.mktemp("routed"), pods=3, picker_args=["--capacity-wait-ttl", "1s"]
    )
    main, canary, slow = stack.pod_ports
    objects = [
        server("main", main),
        server("canary", canary),
        server("slow", slow, trafficPolicy={"timeout": "300ms"}),
        server("nowhere", 1),  # no pod listens on port 1
        route(
            "chat",
            "chat-model",
            [
                {"modelServerName": "main", "weight": 80},
                {"modelServerName": "canary", "weight": 20},
            ],
        ),
        route("slow", "slow-model", [{"modelServerName": "slow"}]),
        route("down", "down-model", [{"modelServerName": "nowhere"}]),
    ]
    with stack.pool_path.open("a") as f:  # the picker reloads its pool file on change
        f.write("---\n" + yaml.safe_dump_all(objects))
    deadline = time.monotonic() + 10
    while ask(stack, "chat-model").status_code != 200:
        assert time.monotonic() < deadline, "the picker never loaded the routes"
        time.sleep(0.2)
    yield stack
    stack.stop()


def ask(stack, model: str, **body) -> requests.Response:
    return requests.post(
        stack.url + "/v1/completions",
        json={"model": model, "prompt": "hello", "max_tokens": 3, **body},
        timeout=60,
    )


def test_a_public_name_is_split_by_weight_and_rewritten_both_ways(routed):
    main, canary, _ = routed.pod_addresses
    served = Counter()
    for _ in range(60):
        r = ask(routed, "chat-model")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "chat-model"  # the engine said infergate-sim
        served[r.headers[SERVED]] += 1
    assert set(served) == {main, canary}  # a 90/10-style split, both used
    assert served[main] > served[canary]
    # The engine's own name still works directly: no route is needed for it.
    assert ask(routed, MODEL).json()["model"] == MODEL


def test_streamed_answers_carry_the_public_name_in_every_event(routed):
    r = requests.post(
        routed.url + "/v1/chat/completions",
        json={
            "model": "chat-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "stream": True,
        },
        stream=True,
        timeout=60,
    )
    assert r.status_code == 200
    events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: {")]
    assert len(events) >= 2
    assert all(json.loads(e)["model"] == "chat-model" for e in events)


def test_unknown_model_is_404_and_a_server_without_pods_503(routed):
    r = ask(routed, "no-such-model")
    assert r.status_code == 404
    assert "no-such-model" in r.json()["error"]["message"]
    r = ask(routed, "down-model")
    assert r.status_code == 503
    assert "no ready pod" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1


def test_a_server_timeout_is_enforced_by_envoy(routed):
    t0 = time.monotonic()
    r = ask(routed, "slow-model", max_tokens=400, ignore_eos=True)
    assert r.status_code == 504, r.text
    assert time.monotonic() - t0 < 5
    assert ask(routed, "slow-model", max_tokens=1).status_code == 200
