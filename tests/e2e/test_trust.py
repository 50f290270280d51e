"""What a client cannot do through the gateway (issue 12, picker side), end to end through a
real Envoy, picker and simulator pods: reach a pod's operator paths (with a body or without),
or pick the engine model with x-gateway-model-name-rewrite."""

from __future__ import annotations

import pytest
import requests

from tests.e2e.gateway_config import MODEL
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("trust"), pods=2)
    yield s
    s.stop()


def picker_404(r: requests.Response) -> bool:
    """The picker's own OpenAI-style 404 (a pod's would be plain or differently shaped)."""
    return r.status_code == 404 and r.json()["error"]["type"] == "NotFound"


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/reset_prefix_cache"),
        ("POST", "/v1/unload_lora_adapter"),
        ("GET", "/metrics"),
        ("GET", "/version"),
    ],
)
def test_a_pods_operator_paths_are_not_reachable_without_a_body(stack, method, path):
    r = requests.request(method, stack.url + path, timeout=30)
    assert picker_404(r), (r.status_code, r.text)


def test_nor_with_a_body(stack):
    lora = {"lora_name": "evil", "lora_path": "/tmp/evil"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize"):
        r = requests.post(stack.url + path, json=lora, timeout=30)
        assert picker_404(r), (path, r.status_code, r.text)


def test_the_inference_apis_reads_still_reach_a_pod(stack):
    r = requests.get(stack.url + "/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    assert MODEL in [m["id"] for m in r.json()["data"]]


def test_a_clients_model_rewrite_header_does_not_choose_the_engine_model(stack):
    r = requests.post(
        stack.url + "/v1/completions",
        headers={"x-gateway-model-name-rewrite": MODEL},
        json={"model": "not-served", "prompt": "hello", "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 404 and "not-served" in r.json()["error"]["message"]
