"""Scale from zero end to end, in standalone mode as `infergate up` runs it: the standalone
controllers (autoscaler included, reading the pickers' demand), a simulator Model with
`minReplicas: 0`, two pickers and Envoy, all real processes.

Idle, the Model goes to zero pods. A request then is held by the picker while the autoscaler,
seeing it in the picker's `infergate_epp_pool_waiting_for_capacity`, starts a pod; the
request is answered 200 and its time to first token (request sent → first streamed token,
pod start included) is printed. Concurrent cold requests are all served. With the
autoscaler stopped (its process paused), a cold request waits out the picker's TTL and gets
503 with Retry-After and an OpenAI-style error body."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import pytest
import requests
import yaml

from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.pods import pool_pods
from infergw.stack.ports import free_stack_ports
from tests.e2e.standalone_helpers import sim_model
from tests.paths import DEFAULT_MODEL

pytestmark = pytest.mark.slow
WINDOW = 4  # the scale-down stabilization window, seconds: idle this long → zero
INTERVAL = 5  # the autoscaler's cycle; at zero it looks every second (AT_ZERO_INTERVAL)
TTL = 25  # the picker's --capacity-wait-ttl: a simulator pod starts well within it
COLD = 6  # concurrent cold requests
PICKERS = 2  # each holds what Envoy gives it; the autoscaler sums their demand


def manifests() -> list[dict]:
    policy = {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "AutoScalingPolicy",
        "metadata": {"name": "to-zero", "namespace": "default"},
        "spec": {
            "metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 4}],
            "behavior": {
                "scaleUp": {"stablePolicy": {"stabilizationWindow": "0s", "period": "1s"}},
                "scaleDown": {
                    "percent": 100,
                    "period": "1s",
                    "stabilizationWindow": f"{WINDOW}s",
                },
            },
        },
    }
    model = sim_model(
        backend={"aggregated": {"replicas": 1}},
        engine_args=["--sim-time-scale=0.2"],
        autoscaling={"minReplicas": 0, "maxReplicas": 2, "policyRef": {"name": "to-zero"}},
    )
    return [policy, model]


@pytest.fixture
def stack(tmp_path):
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "model.yaml").write_text(yaml.safe_dump_all(manifests()))
    (tmp_path / "stack").mkdir()
    s = LocalStack(
        StackConfig(
            workdir=tmp_path / "stack",
            ports=free_stack_ports(1, pickers=PICKERS),
            pickers=PICKERS,
            manifests=directory,
            pool_name="tiny",
            served_model_name="tiny",
            tokenizer_dir=DEFAULT_MODEL,
            expect_pods=0,  # it may already be on its way to zero
            controllers_args=["--autoscale-interval", str(INTERVAL)],
            picker_args=["--capacity-wait-ttl", f"{TTL}s"],
        )
    )
    s.start()
    yield s
    s.stop()


def wait_for_zero(stack: LocalStack, within: float = WINDOW + 30) -> None:
    deadline = time.monotonic() + within
    while pool_pods(stack.pool_path, "tiny") or any(
        stack.picker_endpoints(i) for i in range(PICKERS)
    ):
        assert time.monotonic() < deadline, "the Model never went to zero pods"
        time.sleep(0.2)


def cold_request(stack: LocalStack, n: int) -> tuple[int, float | None, float, str, dict[str, str]]:
    """(status, seconds to the first streamed token, seconds in all, body, headers)."""
    body = {"model": "tiny", "prompt": f"cold {n}", "max_tokens": 8, "stream": True}
    t0 = time.monotonic()
    first = None
    text = []
    with requests.post(
        stack.url + "/v1/completions", json=body, stream=True, timeout=TTL + 30
    ) as r:
        for line in r.iter_lines():
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic() - t0
            text.append(line.decode(errors="replace"))
        return r.status_code, first, time.monotonic() - t0, "\n".join(text), dict(r.headers)


def test_a_model_at_zero_serves_its_first_requests_after_a_pod_starts(stack):
    wait_for_zero(stack)  # idle → zero pods, nothing behind the picker
    time.sleep(2)  # and stays there
    assert not pool_pods(stack.pool_path, "tiny")

    status, ttft, total, text, _ = cold_request(stack, 0)
    assert status == 200, text
    assert ttft is not None and "[DONE]" in text
    print(f"\ncold start: first token {ttft:.2f}s after the request, answer done in {total:.2f}s")
    assert len(pool_pods(stack.pool_path, "tiny")) >= 1

    wait_for_zero(stack)
    with concurrent.futures.ThreadPoolExecutor(COLD) as pool:
        results = list(pool.map(lambda n: cold_request(stack, n), range(1, COLD + 1)))
    assert [r[0] for r in results] == [200] * COLD, [r[3] for r in results if r[0] != 200]
    ttfts = sorted(r[1] for r in results)
    print(f"{COLD} concurrent cold requests: first token after {ttfts[0]:.2f}–{ttfts[-1]:.2f}s")

    # No autoscaler (its process paused): nothing starts, the held request times out.
    wait_for_zero(stack)
    controllers = stack.procs["controllers"]
    os.kill(controllers.pid, signal.SIGSTOP)
    try:
        status, _, total, text, headers = cold_request(stack, 99)
    finally:
        os.kill(controllers.pid, signal.SIGCONT)
    assert status == 503, text
    assert int(headers["retry-after"]) >= 1
    error = json.loads(text)["error"]
    assert "no ready pod for model 'tiny'" in error["message"] and f"{TTL}s" in error["message"]
    assert total >= TTL - 1
