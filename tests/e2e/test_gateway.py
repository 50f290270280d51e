"""End to end through a real Envoy: client → Envoy → picker (ext_proc) → model-server pods."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections import Counter

import pytest
import requests

from infergw.stack.local import LocalStack
from tests.e2e.gateway_config import MODEL, PIN, SERVED, config
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow


def sim_requests(address: str) -> float:
    text = requests.get(f"http://{address}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack for the tests that only send requests through it (each checks its own
    requests' effects), started once: a stack takes 5–15 s to start."""
    s = make_stack(tmp_path_factory.mktemp("gateway"))
    yield s
    s.stop()


def complete(stack: LocalStack, prompt="hello", headers=None, **body) -> requests.Response:
    return requests.post(
        stack.url + "/v1/completions",
        headers=headers or {},
        timeout=60,
        json={"model": MODEL, "prompt": prompt, "max_tokens": 3, **body},
    )


def test_the_served_endpoint_is_the_one_the_picker_chose(stack):
    for address in stack.pod_addresses:
        before = {a: sim_requests(a) for a in stack.pod_addresses}
        r = complete(stack, headers={PIN: address})
        assert r.status_code == 200, r.text
        assert r.headers[SERVED] == address
        after = {a: sim_requests(a) for a in stack.pod_addresses}
        # exactly that pod did the work
        assert {a: after[a] - before[a] for a in after} == {
            a: (1.0 if a == address else 0.0) for a in after
        }
    r = complete(stack)
    assert r.status_code == 200 and r.headers[SERVED] in stack.pod_addresses


def test_errors_come_back_from_the_picker_as_openai_json(stack):
    r = requests.post(
        stack.url + "/v1/completions",
        data=b"{nope",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400
    r = complete(stack, headers={PIN: "10.0.0.99"})
    assert r.status_code == 429


def test_openai_client_streams_through_the_gateway(stack):
    import openai

    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_streaming_reaches_the_client_byte_for_byte(tmp_path):
    from tests.e2e.scripted_backend import SCRIPT

    s = make_stack(
        tmp_path,
        pods=2,
        pod_command=lambda port: [sys.executable, "-m", "tests.e2e.scripted_backend", str(port)],
    )
    try:
        for _ in range(3):
            with requests.post(
                s.url + "/v1/completions",
                timeout=30,
                stream=True,
                json={"model": "scripted", "prompt": "x", "stream": True},
            ) as r:
                assert r.status_code == 200
                got = b"".join(r.iter_content(chunk_size=None))
            assert got == SCRIPT
    finally:
        s.stop()


def test_least_request_spreads_concurrent_load(tmp_path):
    s = make_stack(
        tmp_path,
        picker_config=config(("least-request", 1), ("max-score-picker", None)),
        sim_args=["--sim-time-scale", "1"],
    )
    try:

        def one(i):
            r = complete(s, prompt=f"request {i}", max_tokens=100, ignore_eos=True)
            assert r.status_code == 200, r.text
            return r.headers[SERVED]

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            served = Counter(pool.map(one, range(6)))
        assert sorted(served.values()) == [2, 2, 2], served
    finally:
        s.stop()


def test_prefix_scorer_returns_a_repeated_prompt_to_the_same_pod(tmp_path):
    s = make_stack(
        tmp_path, picker_config=config(("prefix-cache-scorer", 1), ("max-score-picker", None))
    )
    try:
        long_prompt = "You are a careful assistant. " * 40
        first = complete(s, prompt=long_prompt + "Question one?").headers[SERVED]
        again = [
            complete(s, prompt=long_prompt + f"Question {i}?").headers[SERVED] for i in range(2, 8)
        ]
        assert set(again) == {first}
        # unrelated prompts are not pulled to that pod: ties are broken at random
        others = {complete(s, prompt=f"{i} unrelated " * 30).headers[SERVED] for i in range(12)}
        assert len(others) > 1
    finally:
        s.stop()


def wait_picker_marked_down(stack: LocalStack, timeout: float = 10.0) -> None:
    """Envoy's health check notices a dead picker within about half a second."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/clusters"
    while time.monotonic() < deadline:
        lines = requests.get(url, timeout=5).text.splitlines()
        if any(ln.startswith("endpoint-picker::") and "failed_active_hc" in ln for ln in lines):
            return
        time.sleep(0.1)
    raise TimeoutError("Envoy never marked the stopped picker unhealthy")


def test_fail_open_keeps_serving_without_the_picker(tmp_path):
    s = make_stack(tmp_path, failure_mode="FailOpen")
    try:
        assert complete(s).status_code == 200
        s.stop_picker()
        wait_picker_marked_down(s)
        for _ in range(3):
            r = complete(s)
            assert r.status_code == 200, r.text
    finally:
        s.stop()


def test_fail_close_refuses_without_the_picker(tmp_path):
    s = make_stack(tmp_path, failure_mode="FailClose")
    try:
        assert complete(s).status_code == 200
        s.stop_picker()
        wait_picker_marked_down(s)
        r = complete(s)
        assert 500 <= r.status_code < 600
    finally:
        s.stop()


def picker_metric(stack: LocalStack, prefix: str) -> float:
    text = requests.get(
        f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics", timeout=5
    ).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


@pytest.mark.parametrize("response", ["through", "headers", "none"])
def test_what_of_the_response_passes_the_picker(tmp_path, response):
    """The proxy setting (Envoy 1.40 honours no per-request mode_override while the request
    body is FULL_DUPLEX_STREAMED): all of the response through the picker, its headers only,
    or nothing; the picker's own message counts show what it was sent."""
    s = make_stack(
        tmp_path, response_bodies=response == "through", response_headers=response != "none"
    )
    try:
        r = complete(s, max_tokens=8, stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")

        def messages(kind: str) -> float:
            return picker_metric(s, f'infergate_epp_extproc_messages_total{{kind="{kind}"}}')

        tokens = picker_metric(s, "inference_objective_output_tokens_sum")
        done = picker_metric(s, "inference_objective_request_duration_seconds_count")
        errors = picker_metric(s, "inference_objective_request_error_total")
        running = picker_metric(s, "inference_objective_running_requests")
        assert messages("request_headers") == 1 and messages("request_body") >= 1
        if response == "through":
            # (Envoy may join chunks that arrive together: at least one.)
            assert messages("response_headers") == 1 and messages("response_body") >= 1
            assert tokens == 8
        else:
            assert messages("response_body") == 0 and tokens == 0  # the proxy kept it away
        if response == "none":
            assert messages("response_headers") == 0
        # The pod that answered is named either way: by the picker, or by Envoy itself when
        # the picker sees no response headers.
        assert r.headers[SERVED] in s.pod_addresses
        # Either way the request ended well and left no slot taken.
        assert (done, errors, running) == (1, 0, 0)
    finally:
        s.stop()
