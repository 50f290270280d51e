"""Clients that hold the gateway's connections open without finishing a request: the local
Envoy must close them rather than keep each one (and its memory and file descriptor) for ever."""

from __future__ import annotations

import socket

import pytest

from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow

# The template's request_headers_timeout is 10 s; a generous margin for a busy machine, and a
# bound on the test should Envoy never close the connection.
WAIT_FOR_CLOSE_S = 60


def test_headers_that_never_finish_are_cut_off(tmp_path):
    stack = make_stack(tmp_path, pods=1)
    try:
        host, port = stack.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT_FOR_CLOSE_S) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: 1\r\n")
            try:
                answer = conn.recv(4096)
            except TimeoutError:
                pytest.fail(f"Envoy still held a header-less request after {WAIT_FOR_CLOSE_S} s")
        # Envoy answers 408 and closes (or closes outright): either way the connection is gone.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        stack.stop()
