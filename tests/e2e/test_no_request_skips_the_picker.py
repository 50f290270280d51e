"""Request forms that might reach a pod without the picker choosing it, sent raw to a real
Envoy in front of the picker and simulator pods: each must be answered by Envoy or the picker
(an error status), and the pool's cluster must have sent nothing upstream (Envoy's own
`upstream_rq_total` of the pool's cluster, before and after)."""

from __future__ import annotations

import socket

import pytest
import requests

from infergw.stack.envoy_config import PICKER_CLUSTER
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow

WAIT_S = 30  # a bound on each probe should Envoy never answer or close

# (id, the raw request). Each has a body or none as a client could send it; none is an
# inference request the picker would route.
PROBES = [
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("absolute-form-metrics", b"GET http://127.0.0.2:8000/metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("http10-metrics", b"GET /metrics HTTP/1.0\r\n\r\n"),
    ("http10-host-of-a-pod", b"GET /health HTTP/1.0\r\nhost: 127.0.0.2:8000\r\n\r\n"),
    (
        "load-lora-with-a-model",
        b"POST /v1/load_lora_adapter HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 59\r\n\r\n{"model":"m","lora_name":"x","lora_path":"/etc/passwd/..."}',
    ),
    (
        "api-suffix-behind-another-route",
        b"POST /v1/load_lora_adapter/../chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ),
    (
        "reset-cache-absolute-form",
        b"POST http://pod/reset_prefix_cache HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
    ),
    (
        "h2c-upgrade",
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
        b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    ),
    (
        "websocket-upgrade",
        b"GET /v1/realtime HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ),
    ("connect", b"CONNECT 127.0.0.2:8000 HTTP/1.1\r\nhost: 127.0.0.2:8000\r\n\r\n"),
    ("dot-segments", b"GET /v1/responses/../../metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("encoded-slash", b"GET /v1/responses/a%2F..%2F..%2Fmetrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("fragment", b"GET /metrics#/v1/models HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("lowercase-method", b"get /metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("trace", b"TRACE /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("skip-picker"), pods=2)
    yield s
    s.stop()


def pool_requests(stack) -> int:
    """Requests Envoy sent to the pods: its upstream_rq_total over every cluster that is not
    a picker's."""
    stats = requests.get(
        f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/stats",
        params={"filter": r"^cluster\..*\.upstream_rq_total$"},
        timeout=10,
    ).text
    total = 0
    for line in stats.splitlines():
        name, _, value = line.partition(": ")
        cluster = name.removeprefix("cluster.").removesuffix(".upstream_rq_total")
        if not cluster.startswith(PICKER_CLUSTER):
            total += int(value)
    return total


def send_raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as conn:
        conn.sendall(request)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        except TimeoutError:
            pass  # an answer without a length, on a connection kept open
    return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def test_an_inference_request_is_counted_as_reaching_a_pod(stack):
    """The measure can fail: a routed request moves it."""
    before = pool_requests(stack)
    r = requests.post(
        stack.url + "/v1/completions",
        json={"model": "m", "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code in (200, 404), r.text  # the pool's model, or its 404 from the picker
    model = requests.get(stack.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    r = requests.post(
        stack.url + "/v1/completions",
        json={"model": model, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert pool_requests(stack) == before + 1


@pytest.mark.parametrize(("request_bytes"), [p[1] for p in PROBES], ids=[p[0] for p in PROBES])
def test_no_request_form_reaches_a_pod_unchosen(stack, request_bytes):
    before = pool_requests(stack)
    answer = send_raw(stack.url, request_bytes)
    status_line = answer.split(b"\r\n", 1)[0]
    assert pool_requests(stack) == before, (status_line, answer[:400])
    # Answered by Envoy or the picker with an error, or the connection closed unanswered.
    print(status_line)  # what answered it, for the record (-rA)
    if answer:
        assert status_line.split(b" ")[1][:1] in (b"4", b"5"), answer[:400]
