"""Request forms that might reach a pod without the picker choosing it, sent raw to a real
Envoy in front of the pickers and simulator pods — one pool, and two Models behind the
body-based router (whose routes switch the picker filter on per route, FilterConfig): each
must be answered by Envoy, the router or a picker (an error status), and no pool's cluster
may have sent anything upstream (Envoy's own `upstream_rq_total`, before and after)."""

from __future__ import annotations

import socket

import pytest
import requests

from infergw.api.names import MODEL_NAME_HEADER
from infergw.api.pod_ports import MANY
from infergw.stack.envoy_config import POOL_CLUSTER
from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.e2e.stack_fixtures import make_stack
from tests.paths import ROOT

pytestmark = pytest.mark.slow

WAIT_S = 30  # a bound on each probe should Envoy never answer or close

# (id, the raw request). Each has a body or none as a client could send it; none is an
# inference request the picker would route.
PROBES = [
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("absolute-form-metrics", b"GET http://127.0.0.2:8000/metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("http10-metrics", b"GET /metrics HTTP/1.0\r\n\r\n"),
    ("http10-host-of-a-pod", b"GET /health HTTP/1.0\r\nhost: 127.0.0.2:8000\r\n\r\n"),
    ("host-of-a-pod", b"GET /health HTTP/1.1\r\nhost: 127.0.0.2:8000\r\n\r\n"),
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
    ("connect-a-path", b"CONNECT /v1/completions HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("dot-segments", b"GET /v1/responses/../../metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("encoded-slash", b"GET /v1/responses/a%2F..%2F..%2Fmetrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("fragment", b"GET /metrics#/v1/models HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("lowercase-method", b"get /metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
    ("trace", b"TRACE /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"),
    # The router's header, forged (the route a request matches first is chosen by it).
    (
        "forged-pool-header-bodyless",
        b"GET /metrics HTTP/1.1\r\nhost: x\r\n%s: chat\r\n\r\n" % MODEL_NAME_HEADER.encode(),
    ),
    (
        "forged-pool-header-operator-route",
        b"POST /reset_prefix_cache HTTP/1.1\r\nhost: x\r\n%s: code\r\ncontent-length: 22\r\n"
        b'\r\n{"model":"chat-sim"}  ' % MODEL_NAME_HEADER.encode(),
    ),
]


@pytest.fixture(scope="module", params=["one-pool", "two-models"])
def stack(tmp_path_factory, request):
    run = tmp_path_factory.mktemp("skip-picker")
    if request.param == "one-pool":
        s = make_stack(run, pods=2)
        yield s
        s.stop()
        return
    example = Example.read(ROOT / "examples" / "two-models").with_changes(
        run / "example", engine_args=["--sim-time-scale=0.2"]
    )
    ports = free_stack_ports(pods=example.pod_count(), pickers=len(example.models))
    cfg = StackConfig.from_example(example, run / "stack", ports, pod_addresses=MANY)
    with LocalStack(cfg) as running:
        yield running


def pool_requests(stack) -> int:
    """Requests Envoy sent to the pods: its upstream_rq_total over the pools' clusters."""
    pools = {POOL_CLUSTER} | {plan.name for plan in stack.plans}
    stats = requests.get(
        f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/stats",
        params={"filter": r"^cluster\..*\.upstream_rq_total$"},
        timeout=10,
    ).text
    total = 0
    for line in stats.splitlines():
        name, _, value = line.partition(": ")
        cluster = name.removeprefix("cluster.").removesuffix(".upstream_rq_total")
        if cluster in pools:
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
            pytest.fail(f"no whole answer within {WAIT_S} s: {answer[:300]!r}")
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
    # Answered at once (a CONNECT was held for ever behind the router), with an error.
    assert status_line.split(b" ")[1][:1] in (b"4", b"5"), answer[:400]
