"""Flow control and priorities end to end through a real Envoy (issue 7).

One slow simulator pod that runs one sequence at a time (`--max-num-seqs 1`, 20 ms a decode
step): a request of 50 tokens holds it for about a second. The picker's `flowControl` counts
an endpoint saturated as soon as anything waits in it (`queueDepthThreshold: 0.5`), so with
one request running and one waiting in the pod, further requests wait in the picker. The pool
file holds InferenceObjectives: `interactive` (priority 10), `batch` (-1, sheddable) and
`limited` (1, a band that holds one request).

What the checks observe: completion times and order at the client; the picker's gauge
`infergate_epp_flow_control_queue_size`; and the pod's own counters (`vllm:request_success`,
`vllm:prompt_tokens`), which show what reached it.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from dataclasses import dataclass

import pytest
import requests
import yaml

from infergw.api.names import OBJECTIVE_HEADER
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.conftest import free_port
from tests.e2e.gateway_config import MODEL, config
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

TTL = 2.5
MAX_QUEUED = 5
FLOW_CONTROL = f"""
flowControl:
  maxRequests: {MAX_QUEUED}
  defaultRequestTTL: {TTL}s
  saturation:
    queueDepthThreshold: 0.5     # anything waiting in the pod saturates it
    metricsStalenessThreshold: 2s  # two shared cores: a late scrape is not a full pod
  priorityBands:
  - {{priority: 1, maxRequests: 1}}
"""
LONG, SHORT = 50, 5  # output tokens: about 1.05 s and 0.1 s on the pod


def objective(name: str, priority: int) -> dict:
    return {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": "quickstart"}},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("priorities")
    picker_config = tmp / "epp-config.yaml"
    picker_config.write_text(
        config(("least-request", 1), ("max-score-picker", None)) + FLOW_CONTROL
    )
    s = LocalStack(
        StackConfig(
            workdir=tmp,
            pods=1,
            ports=free_stack_ports(1),
            pod_ports=[free_port()],
            picker_config=picker_config,
            sim_args=["--max-num-seqs", "1", "--sim-decode-ms-per-step", "20"],
            # Requests name their objective themselves, as on a closed network.
            trust_client_headers=True,
        )
    )
    objectives = [objective("interactive", 10), objective("batch", -1), objective("limited", 1)]
    with s.pool_path.open("a") as f:
        f.write("---\n" + yaml.safe_dump_all(objectives))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def pool(stack):
    """The stack, idle before and after the test."""
    wait_idle(stack)
    yield stack
    wait_idle(stack)


@dataclass
class Done:
    status: int
    headers: dict[str, str]
    body: dict
    at: float  # monotonic time the client had the whole answer


def send(stack: LocalStack, tokens: int = SHORT, objective: str | None = None, prompt="hi"):
    r = requests.post(
        stack.url + "/v1/completions",
        headers={OBJECTIVE_HEADER: objective} if objective else {},
        json={"model": MODEL, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True},
        timeout=30,
    )
    return Done(r.status_code, dict(r.headers), r.json(), time.monotonic())


def metric(url: str, name: str) -> float:
    text = requests.get(url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def queued(stack: LocalStack) -> float:
    url = f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics"
    return metric(url, "infergate_epp_flow_control_queue_size")


def pod(stack: LocalStack, name: str) -> float:
    (address,) = stack.pod_addresses
    return metric(f"http://{address}/metrics", name)


def wait_idle(stack: LocalStack) -> None:
    def idle() -> bool:
        return queued(stack) == 0 and (
            pod(stack, "vllm:num_requests_running") + pod(stack, "vllm:num_requests_waiting") == 0
        )

    wait_for(idle, "an idle pool", within=15)
    time.sleep(0.1)  # a scrape or two, so the picker sees it idle too


def saturate(stack: LocalStack, run: concurrent.futures.Executor, tokens: int = LONG):
    """One request running in the pod and one waiting there: the picker holds the next."""
    blocker = run.submit(send, stack, tokens)
    wait_for(lambda: pod(stack, "vllm:num_requests_running") == 1, "the blocker to run", within=5)
    filler = run.submit(send, stack, SHORT)
    wait_for(lambda: pod(stack, "vllm:num_requests_waiting") == 1, "the filler to wait", within=5)
    return blocker, filler


def test_a_high_priority_request_overtakes_the_queue(pool):
    with concurrent.futures.ThreadPoolExecutor(8) as run:
        blocker, filler = saturate(pool, run)
        normal = []
        for i in range(4):  # priority 0, queued in the picker in this order
            normal.append(run.submit(send, pool))
            wait_for(lambda n=i + 1: queued(pool) == n, f"{i + 1} queued", within=5)
        urgent = run.submit(send, pool, SHORT, "interactive")
        wait_for(lambda: queued(pool) == 5, "the interactive request to queue", within=5)
        assert not blocker.done()  # all of that happened while the pod was busy
        done = [f.result() for f in (blocker, filler, *normal, urgent)]
    assert [d.status for d in done] == [200] * 7, [d.body for d in done]
    *_, first_normal, _, _, last_normal, interactive = done
    # The interactive request came last and finished before every request queued before it;
    # those, all of one priority, finished in the order they came.
    assert interactive.at < first_normal.at, [d.at - done[0].at for d in done]
    finished = [d.at for d in done[:-1]]
    assert finished == sorted(finished)
    assert last_normal.at - interactive.at > 0.3  # four short answers after it, not a tie


def test_sheddable_requests_are_refused_while_saturated_and_served_when_idle(pool):
    assert send(pool, objective="batch").status == 200  # idle: room, and nothing queued
    with concurrent.futures.ThreadPoolExecutor(4) as run:
        blocker, filler = saturate(pool, run)
        shed = send(pool, objective="batch")
        assert shed.status == 429, shed.body
        assert int(shed.headers["retry-after"]) >= 1
        assert "sheddable" in shed.body["error"]["message"]
        assert shed.body["error"]["type"] == "TooManyRequests"
        assert not blocker.done()  # refused at once, not after waiting for room
        assert blocker.result().status == filler.result().status == 200
    wait_idle(pool)
    assert send(pool, objective="batch").status == 200


def test_a_full_queue_refuses_with_429(pool):
    with concurrent.futures.ThreadPoolExecutor(8) as run:
        blocker, filler = saturate(pool, run)
        waiting = [run.submit(send, pool, SHORT, "limited")]
        wait_for(lambda: queued(pool) == 1, "the limited request to queue", within=5)
        # Its band (priority 1) holds one request.
        full_band = send(pool, objective="limited")
        assert full_band.status == 429, full_band.body
        assert "priority band 1 holds its limit of 1 requests" in full_band.body["error"]["message"]
        assert int(full_band.headers["retry-after"]) >= 1
        for n in range(2, MAX_QUEUED + 1):
            waiting.append(run.submit(send, pool))
            wait_for(lambda n=n: queued(pool) == n, f"{n} queued", within=5)
        # The whole queue holds five.
        full = send(pool)
        assert full.status == 429, full.body
        assert (
            f"the queue holds its limit of {MAX_QUEUED} requests" in full.body["error"]["message"]
        )
        assert int(full.headers["retry-after"]) >= 1
        assert not blocker.done()
        # Queued requests are never displaced: each is served.
        assert [f.result().status for f in (blocker, filler, *waiting)] == [200] * 7


def test_a_client_that_leaves_leaves_the_queue_at_once(pool):
    successes = pod(pool, "vllm:request_success_total")
    prompt_tokens = pod(pool, "vllm:prompt_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(4) as run:
        blocker, filler = saturate(pool, run)
        # A request with a long prompt of its own, on a connection the test closes.
        body = json.dumps(
            {"model": MODEL, "prompt": "leaving " * 200, "max_tokens": SHORT}
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", pool.cfg.ports.envoy, timeout=10)
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        wait_for(lambda: queued(pool) == 1, "the request to queue", within=5)
        conn.close()
        t0 = time.monotonic()
        wait_for(lambda: queued(pool) == 0, "the queue to empty", within=5)
        gone = time.monotonic() - t0
        assert gone < 0.5, gone  # at once: not when the pod frees up, nor at the TTL
        assert not blocker.done()
        served = [blocker.result(), filler.result()]
    wait_idle(pool)
    time.sleep(0.3)
    # The pod ran the blocker and the filler, and never saw the request that left.
    assert pod(pool, "vllm:request_success_total") - successes == 2
    used = sum(d.body["usage"]["prompt_tokens"] for d in served)
    assert pod(pool, "vllm:prompt_tokens_total") - prompt_tokens == used


def test_a_request_queued_past_its_ttl_gets_503(pool):
    with concurrent.futures.ThreadPoolExecutor(4) as run:
        # The pod stays busy for longer than the TTL (150 tokens at 20 ms).
        blocker, filler = saturate(pool, run, tokens=150)
        t0 = time.monotonic()
        expired = send(pool)
        waited = time.monotonic() - t0
        assert expired.status == 503, expired.body
        assert f"waited in the queue past its TTL of {TTL:g}s" in expired.body["error"]["message"]
        assert TTL - 0.1 < waited < TTL + 1, waited
        assert not blocker.done()
        assert blocker.result().status == filler.result().status == 200
