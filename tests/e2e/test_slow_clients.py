"""Clients that hold the gateway's connections open without finishing a request: the local
Envoy must close them rather than keep each one (and its memory and file descriptor) for ever."""

from __future__ import annotations

import socket

import pytest
import requests

from infergw.api.names import SERVED_HEADER
from tests.e2e.header_flood import FLOODS, WAIT_FOR_CLOSE_S, assert_431_with_json_body, send_flood
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack_one_pod(tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("stack"), pods=1)
    try:
        yield stack
    finally:
        stack.stop()


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
