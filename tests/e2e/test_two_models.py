"""Two Models behind one Envoy (examples/two-models), as `infergate up DIR` runs them: real
Envoy, the standalone controllers' simulator pods, a picker per pool and the body-based router
in front. Every request goes to the same path; the body's model decides the pool."""

from __future__ import annotations

import base64
import re

import pytest
import requests

from infergw.api.names import MODEL_NAME_HEADER, SERVED_HEADER
from infergw.api.pod_ports import MANY, ONE
from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.e2e.header_flood import FLOODS, assert_431_with_json_body, send_flood
from tests.paths import ROOT

pytestmark = pytest.mark.slow

SERVED = {"chat": {"chat-sim", "chat-sql"}, "code": {"code-sim", "coder"}}


@pytest.fixture(scope="module", params=[MANY, ONE])
def stack(tmp_path_factory, request):
    """Pods on addresses of their own, or all on 127.0.0.1 with ports of their own (macOS)."""
    run = tmp_path_factory.mktemp("two-models")
    example = Example.read(ROOT / "examples" / "two-models").with_changes(
        run / "example", engine_args=["--sim-time-scale=0.2"]
    )
    ports = free_stack_ports(pods=example.pod_count(), pickers=len(example.models))
    cfg = StackConfig.from_example(example, run / "stack", ports, pod_addresses=request.param)
    with LocalStack(cfg) as running:
        pods = pods_of(running, "chat") | pods_of(running, "code")
        assert len(pods) == 3 and (request.param == ONE) == all(
            p.startswith("127.0.0.1:") for p in pods
        ), pods
        yield running


def pods_of(stack: LocalStack, pool: str) -> set[str]:
    plan = next(p for p in stack.plans if p.name == pool)
    return set(stack.picker_endpoints(stack.pickers_of(plan)[0]))


def chat(stack: LocalStack, model: str, **kw) -> requests.Response:
    return requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
        **kw,
    )


@pytest.mark.parametrize(
    ("model", "pool"),
    [("chat-sim", "chat"), ("chat-sql", "chat"), ("code-sim", "code"), ("coder", "code")],
)
def test_each_name_lands_on_its_models_pods(stack, model, pool):
    """Served names, a LoRA adapter and a ModelRoute name, each on its own pool's pods, and
    the answer names the model the client asked for."""
    assert len(pods_of(stack, "chat")) == 2 and len(pods_of(stack, "code")) == 1
    for _ in range(3):
        r = chat(stack, model)
        assert r.status_code == 200, r.text
        assert r.headers[SERVED_HEADER] in pods_of(stack, pool)
        assert r.json()["model"] == model


def test_a_clients_header_does_not_choose_the_pool(stack):
    r = chat(stack, "chat-sim", headers={MODEL_NAME_HEADER: "code"})
    assert r.status_code == 200 and r.headers[SERVED_HEADER] in pods_of(stack, "chat")


def test_an_unknown_model_is_404_model_not_found(stack):
    r = chat(stack, "gpt-9")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model":"chat-sim","model":"code-sim","messages":[]}',
        b'{"model":"chat-sim","messages":[],"x":"\\ud800"}',
        b'{"messages":[{"role":"user","content":"hi"}]}',
    ],
)
def test_a_hostile_body_is_a_clean_400(stack, body):
    r = requests.post(
        stack.url + "/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) >= {"message", "type", "code"}


def test_the_router_lists_every_model_and_route_and_other_bodyless_requests_have_no_pool(stack):
    r = requests.get(stack.url + "/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    listed = [m["id"] for m in r.json()["data"]]
    assert sorted(listed) == sorted(SERVED["chat"] | SERVED["code"])
    r = requests.get(stack.url + "/v1/models/coder", timeout=30)
    assert r.status_code == 200 and r.json()["owned_by"] == "default"
    r = requests.get(stack.url + "/v1/responses/resp_1", timeout=30)  # the engine's own id
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def respond(stack: LocalStack, model: str) -> requests.Response:
    body = {"model": model, "input": "hi", "max_output_tokens": 2}
    return requests.post(stack.url + "/v1/responses", json=body, timeout=60)


@pytest.mark.parametrize(("model", "pool"), [("chat-sql", "chat"), ("coder", "code")])
def test_a_stored_response_is_read_back_through_the_pool_its_id_names(stack, model, pool):
    """`GET /v1/responses/{id}` has no body to name a model: the router reads the pool from
    the id, that pool's picker the pod."""
    made = respond(stack, model)
    assert made.status_code == 200, made.text
    response_id, pod = made.json()["id"], made.headers[SERVED_HEADER]
    assert pod in pods_of(stack, pool)
    for _ in range(3):
        got = requests.get(f"{stack.url}/v1/responses/{response_id}", timeout=30)
        assert got.status_code == 200, got.text
        assert got.json()["id"] == response_id and got.headers[SERVED_HEADER] == pod


def test_a_response_id_naming_a_pool_not_served_here_is_404(stack):
    response_id = respond(stack, "code-sim").json()["id"]
    place = base64.urlsafe_b64encode(b"gone/code-0:8000").rstrip(b"=").decode()
    elsewhere = ".".join([response_id.split(".")[0], place, *response_id.split(".")[2:]])
    r = requests.get(f"{stack.url}/v1/responses/{elsewhere}", timeout=30)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "response_not_found" and "InferencePool gone" in error["message"]


def test_the_router_counts_what_it_routed(stack):
    chat(stack, "code-sim")
    chat(stack, "nobody-serves-this")
    text = requests.get(
        f"http://127.0.0.1:{stack.cfg.ports.router.metrics}/metrics", timeout=10
    ).text
    routed = dict(re.findall(r'infergate_bbr_routed_total\{pool="(\w+)"\} (\S+)', text))
    assert float(routed["code"]) >= 1
    assert re.search(r'infergate_bbr_requests_total\{result="model_not_found"\}', text)


@pytest.mark.parametrize(("headers", "detail"), FLOODS)
def test_a_header_flood_is_answered_431_before_any_router_or_picker(stack, headers, detail):
    # No route: the body-based router sees only requests, and the pickers' filter is in the
    # chain of a routed request alone.
    assert_431_with_json_body(send_flood(stack.url, headers), detail)
