"""Clients that hold the gateway's connections open without finishing a request: the local
Envoy must close them rather than keep each one (and its memory and file descriptor) for ever."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from infergw.api.names import SERVED_HEADER
from tests.e2e.header_flood import FLOODS, WAIT_FOR_CLOSE_S, assert_431_with_json_body, send_flood
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow


def _served(stack):
    """A module fixture's body: the stack while the module's tests run, then stopped."""
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def stack_one_pod(tmp_path_factory):
    yield from _served(make_stack(tmp_path_factory.mktemp("stack"), pods=1))


def test_headers_that_never_finish_are_cut_off(stack_one_pod):
    stack = stack_one_pod
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_FOR_CLOSE_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: 1\r\n")
        try:
            answer = conn.recv(4096)
        except TimeoutError:
            pytest.fail(f"Envoy still held a header-less request after {WAIT_FOR_CLOSE_S} s")
    # Envoy answers 408 and closes.
    assert answer.startswith(b"HTTP/1.1 408"), answer


@pytest.mark.parametrize(("headers", "detail"), FLOODS)
def test_a_header_flood_is_answered_431_with_a_json_body(stack_one_pod, headers, detail):
    # Envoy's local reply went through the picker's ext_proc on its way out, which waited on a
    # picker that never saw the request while Envoy closed the connection: an empty reply.
    assert_431_with_json_body(send_flood(stack_one_pod.url, headers), detail)
    # The gateway still serves, and the picker still sees answers' headers (a pod is named).
    ok = {"model": "infergate-sim", "prompt": "hi", "max_tokens": 2}
    r = requests.post(stack_one_pod.url + "/v1/completions", json=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers.get(SERVED_HEADER), r.headers


# A picker whose request bytes budget holds one stalled body (so a body it kept would refuse
# the next request 429) and which gives up on a body after a gap of BODY_TIMEOUT_S.
BODY_TIMEOUT_S = 1
HELD = 4096
STALLED = 3900  # bytes of a body of STALLED + 100 that the client sends before it stalls


@pytest.fixture(scope="module")
def stack_body_bound(tmp_path_factory):
    stack = make_stack(
        tmp_path_factory.mktemp("stack"),
        pods=1,
        picker_args=[
            "--request-body-timeout",
            f"{BODY_TIMEOUT_S}s",
            "--max-body-bytes",
            str(HELD),
            "--max-held-request-bytes",
            str(HELD),
        ],
    )
    yield from _served(stack)


def test_a_body_that_stalls_is_answered_408_and_the_picker_lets_it_go(stack_body_bound):
    stack = stack_body_bound
    host, port = stack.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {STALLED + 100}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=WAIT_FOR_CLOSE_S) as conn:
        conn.sendall(
            head.encode() + b'{"model": "infergate-sim", "prompt": "' + b"a" * (STALLED - 38)
        )
        answer = b""
        try:
            while chunk := conn.recv(65536):  # Envoy answers, then closes the connection
                answer += chunk
        except TimeoutError:
            pytest.fail(
                f"the gateway still held a stalled body after {WAIT_FOR_CLOSE_S} s: {answer!r}"
            )
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "RequestTimeout", body
    assert f"after {STALLED} bytes" in body["error"]["message"], body
    # The picker gave the stalled body's bytes back: this request (with what parsing holds
    # beside it) would not fit beside them.
    ok = {"model": "infergate-sim", "prompt": "hi", "max_tokens": 2}
    r = requests.post(stack.url + "/v1/completions", json=ok, timeout=60)
    assert r.status_code == 200, r.text


def test_a_long_streamed_answer_is_not_cut_by_the_body_bound(stack_body_bound):
    # A body that ends at once, then an answer of many events: the bound is the body's only.
    ask = {"model": "infergate-sim", "prompt": "hi", "max_tokens": 1000, "stream": True}
    with requests.post(
        stack_body_bound.url + "/v1/completions", json=ask, stream=True, timeout=120
    ) as r:
        assert r.status_code == 200, r.text
        events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]", events[-3:]
    assert len(events) > 500
