"""Flow control and priorities end to end through a real Envoy (issue 7).

One slow simulator pod that runs one sequence at a time (`--max-num-seqs 1`, 20 ms a decode
step). The picker's `flowControl` counts an endpoint saturated as soon as anything waits in it
(`queueDepthThreshold: 0.5`), so with one request running and one waiting in the pod, further
requests wait in the picker. The pool file holds InferenceObjectives: `interactive` (priority
10), `batch` (-1, sheddable) and `limited` (1, a band that holds one request).

Safe on a loaded machine: the request that keeps the pod busy asks for far more tokens than
any test needs and runs until the test closes its connection (the simulator then aborts it,
as vLLM does), so what the picker holds does not depend on how fast the machine decodes; the
queue's TTL is a minute, except in the one test about the TTL, which has a stack of its own.

What the checks observe: completion times and order at the client; the picker's gauge
`infergate_epp_flow_control_queue_size`; and the pod's own counters (`vllm:request_success`,
`vllm:prompt_tokens`), which show what reached it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path

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

TTL = 60  # no test waits for it but the TTL test, whose stack has SHORT_TTL
SHORT_TTL = 1.5
MAX_QUEUED = 5
FLOW_CONTROL = """
flowControl:
  maxRequests: {max_queued}
  defaultRequestTTL: {ttl}s
  saturation:
    queueDepthThreshold: 0.5     # anything waiting in the pod saturates it
    metricsStalenessThreshold: 2s  # two shared cores: a late scrape is not a full pod
  priorityBands:
  - {{priority: 1, maxRequests: 1}}
"""
HELD = 2000  # output tokens: 40 s on the pod, far beyond any test; the test releases it
SHORT = 5  # about 0.1 s on the pod


def objective(name: str, priority: int) -> dict:
    return {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": "quickstart"}},
    }


@contextlib.contextmanager
def running_stack(tmp: Path, ttl: float):
    picker_config = tmp / "epp-config.yaml"
    picker_config.write_text(
        config(("least-request", 1), ("max-score-picker", None))
        + FLOW_CONTROL.format(max_queued=MAX_QUEUED, ttl=ttl)
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
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("priorities"), TTL) as s:
        yield s


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


WAIT = 30  # seconds allowed for any state the test waits for: generous on a loaded machine


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's series; with `label` (`key="value"`), of those that carry it."""
    text = requests.get(url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {" and label in line
    )


def picker(stack: LocalStack, name: str) -> float:
    return metric(f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics", name)


def queued(stack: LocalStack) -> float:
    return picker(stack, "infergate_epp_flow_control_queue_size")


def picker_sees(stack: LocalStack, running: int, waiting: int) -> bool:
    """The pod's counts as the picker last scraped them (its pool gauges, one pod): what it
    decides saturation on, a scrape behind the pod's own."""
    return (
        picker(stack, "inference_pool_average_running_requests") == running
        and picker(stack, "inference_pool_average_queue_size") == waiting
    )


def pod(stack: LocalStack, name: str, label: str = "") -> float:
    (address,) = stack.pod_addresses
    return metric(f"http://{address}/metrics", name, label)


def wait_idle(stack: LocalStack) -> None:
    def idle() -> bool:
        return queued(stack) == 0 and (
            pod(stack, "vllm:num_requests_running") + pod(stack, "vllm:num_requests_waiting") == 0
        )

    wait_for(idle, "an idle pool", within=WAIT)
    wait_for(lambda: picker_sees(stack, 0, 0), "the picker to see the pool idle", within=WAIT)


def running(stack: LocalStack) -> float:
    return pod(stack, "vllm:num_requests_running")


@contextlib.contextmanager
def saturated(stack: LocalStack, run: concurrent.futures.Executor):
    """One request running in the pod and one waiting there, so the picker holds the next.
    The running one lasts until the block ends and closes its connection; then the filler
    (the future this yields) runs, and after it whatever the picker holds."""
    body = json.dumps({"model": MODEL, "prompt": "hold", "max_tokens": HELD, "ignore_eos": True})
    blocker = http.client.HTTPConnection("127.0.0.1", stack.cfg.ports.envoy, timeout=60)
    try:
        blocker.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        wait_for(lambda: running(stack) == 1, "the blocker to run", within=WAIT)
        filler = run.submit(send, stack, SHORT)
        wait_for(
            lambda: pod(stack, "vllm:num_requests_waiting") == 1, "the filler to wait", within=WAIT
        )
        # Until a scrape shows the filler waiting, a request may still go to the pod.
        wait_for(lambda: picker_sees(stack, 1, 1), "the picker to see the pod full", within=WAIT)
        yield filler
    finally:
        blocker.close()


def test_a_high_priority_request_overtakes_the_queue(pool):
    with concurrent.futures.ThreadPoolExecutor(8) as run:
        with saturated(pool, run) as filler:
            normal = []
            for i in range(4):  # priority 0, queued in the picker in this order
                normal.append(run.submit(send, pool))
                wait_for(lambda n=i + 1: queued(pool) == n, f"{i + 1} queued", within=WAIT)
            urgent = run.submit(send, pool, SHORT, "interactive")
            wait_for(lambda: queued(pool) == 5, "the interactive request to queue", within=WAIT)
        done = [f.result() for f in (filler, *normal, urgent)]
    assert [d.status for d in done] == [200] * 6, [d.body for d in done]
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
        with saturated(pool, run) as filler:
            shed = send(pool, objective="batch")
            assert shed.status == 429, shed.body
            assert int(shed.headers["retry-after"]) >= 1
            assert "sheddable" in shed.body["error"]["message"]
            assert shed.body["error"]["type"] == "TooManyRequests"
            assert not filler.done()  # refused at once, not after waiting for room
        assert filler.result().status == 200
    wait_idle(pool)
    assert send(pool, objective="batch").status == 200


def test_a_full_queue_refuses_with_429(pool):
    with concurrent.futures.ThreadPoolExecutor(8) as run:
        with saturated(pool, run) as filler:
            waiting = [run.submit(send, pool, SHORT, "limited")]
            wait_for(lambda: queued(pool) == 1, "the limited request to queue", within=WAIT)
            # Its band (priority 1) holds one request.
            full_band = send(pool, objective="limited")
            assert full_band.status == 429, full_band.body
            message = full_band.body["error"]["message"]
            assert "priority band 1 holds its limit of 1 requests" in message
            assert int(full_band.headers["retry-after"]) >= 1
            for n in range(2, MAX_QUEUED + 1):
                waiting.append(run.submit(send, pool))
                wait_for(lambda n=n: queued(pool) == n, f"{n} queued", within=WAIT)
            # The whole queue holds five.
            full = send(pool)
            assert full.status == 429, full.body
            message = full.body["error"]["message"]
            assert f"the queue holds its limit of {MAX_QUEUED} requests" in message
            assert int(full.headers["retry-after"]) >= 1
            assert queued(pool) == MAX_QUEUED  # refused without displacing a queued request
        # Queued requests are never displaced: each is served.
        assert [f.result().status for f in (filler, *waiting)] == [200] * 6


def finished(stack: LocalStack, reason: str) -> float:
    return pod(stack, "vllm:request_success_total", f'finished_reason="{reason}"')


def test_a_client_that_leaves_leaves_the_queue_at_once(pool):
    completed, aborted = finished(pool, "length"), finished(pool, "abort")
    prompt_tokens = pod(pool, "vllm:prompt_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(4) as run:
        with saturated(pool, run) as filler:
            # A request with a long prompt of its own, on a connection the test closes.
            body = json.dumps(
                {"model": MODEL, "prompt": "leaving " * 200, "max_tokens": SHORT}
            ).encode()
            conn = http.client.HTTPConnection("127.0.0.1", pool.cfg.ports.envoy, timeout=10)
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            wait_for(lambda: queued(pool) == 1, "the request to queue", within=WAIT)
            conn.close()
            # At once: while the pod is still held (not when it frees up), and long before
            # the TTL.
            wait_for(lambda: queued(pool) == 0, "the queue to empty", within=WAIT)
            assert running(pool) == 1 and not filler.done()
        served = filler.result()
    wait_idle(pool)
    # The pod completed the filler and aborted the held request; the request that left
    # never reached it: what it prefilled beyond the filler's prompt is the held request's
    # one-word prompt, not the 200 words of the one that left.
    assert served.status == 200
    assert (finished(pool, "length") - completed, finished(pool, "abort") - aborted) == (1, 1)
    prefilled = pod(pool, "vllm:prompt_tokens_total") - prompt_tokens
    assert prefilled - served.body["usage"]["prompt_tokens"] < 200, prefilled


def test_a_request_queued_past_its_ttl_gets_503(tmp_path):
    with running_stack(tmp_path, SHORT_TTL) as stack:
        with concurrent.futures.ThreadPoolExecutor(4) as run:
            with saturated(stack, run) as filler:
                t0 = time.monotonic()
                expired = send(stack)
                waited = time.monotonic() - t0
                assert expired.status == 503, expired.body
                message = expired.body["error"]["message"]
                assert f"waited in the queue past its TTL of {SHORT_TTL:g}s" in message
                assert waited > SHORT_TTL - 0.1, waited  # not before its TTL
                assert running(stack) == 1  # and while the pod was still busy
            assert filler.result().status == 200
