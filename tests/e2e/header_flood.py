"""A header flood sent raw to an Envoy listener, and Envoy's answer read to the connection's
close: too many request headers, or one too large, must get Envoy's 431 with the OpenAI-style
body of the local Envoy's local_reply_config, not an empty reply."""

from __future__ import annotations

import json
import socket

import pytest

# A bound on each test should Envoy never close the connection.
WAIT_FOR_CLOSE_S = 60

# Past Envoy's limits (100 headers, 60 KiB of them), each with the detail Envoy names.
FLOODS = [
    pytest.param(
        b"".join(b"x-h%d: v\r\n" % i for i in range(120)),
        "http1.too_many_headers",
        id="120-headers",
    ),
    pytest.param(b"x-big: " + b"a" * 70_000 + b"\r\n", "http1.headers_too_large", id="70KB-header"),
]


def send_flood(url: str, headers: bytes) -> bytes:
    """A completion request with these headers, and all Envoy sends back until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_FOR_CLOSE_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def assert_431_with_json_body(answer: bytes, detail: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == 431 and err["type"] == "RequestHeaderFieldsTooLarge"
    assert "at most 100 headers and 60 KiB" in err["message"]
    assert detail in err["message"]
