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

from infergw.stack.pods import pool_pods
from tests.e2e.scale_to_zero import COLD, TTL, cold_request, wait_for_zero, zero_stack

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(tmp_path):
    s = zero_stack(tmp_path)
    s.start()
    yield s
    s.stop()


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
