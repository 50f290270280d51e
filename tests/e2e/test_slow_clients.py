"""Clients that hold the gateway's connections open without finishing a request: the local
Envoy must close them rather than keep each one (and its memory and file descriptor) for ever."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from infergw.api.names import SERVED_HEADER
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow

# The template's request_headers_timeout is 10 s; a generous margin for a busy machine, and a
# bound on the test should Envoy never close the connection.
WAIT_FOR_CLOSE_S = 60


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


def read_all(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        (b"".join(b"x-h%d: v\r\n" % i for i in range(120)), b"http1.too_many_headers"),
        (b"x-big: " + b"a" * 70_000 + b"\r\n", b"http1.headers_too_large"),
    ],
    ids=["120-headers", "70KB-header"],
)
def test_a_header_flood_is_answered_431_with_a_json_body(stack_one_pod, headers, detail):
    # Envoy's local reply went through the picker's ext_proc on its way out, which waited on a
    # picker that never saw the request while Envoy closed the connection: an empty reply.
    host, port = stack_one_pod.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_FOR_CLOSE_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
        answer = read_all(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == 431 and err["type"] == "RequestHeaderFieldsTooLarge"
    assert "at most 100 headers and 60 KiB" in err["message"]
    assert detail.decode() in err["message"]
    # The gateway still serves, and the picker still sees answers' headers (a pod is named).
    ok = {"model": "infergate-sim", "prompt": "hi", "max_tokens": 2}
    r = requests.post(stack_one_pod.url + "/v1/completions", json=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers.get(SERVED_HEADER), r.headers
