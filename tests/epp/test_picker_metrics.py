"""The metrics issue 18 added, through a real picker process (flow control on) played over
ext_proc as Envoy plays it, read from its /metrics: what one request and its answer record."""

from __future__ import annotations

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import extproc_client as ec
from tests.picker_fixtures import CONFIG, Picker, sims  # noqa: F401 (fixture)

MODEL = "infergate-sim"
FAIRNESS = "tenant-a"


@pytest.fixture(scope="module")
def picker(sims, tmp_path_factory):  # noqa: F811
    p = Picker(tmp_path_factory.mktemp("picker"), sims, extra=("--trust-client-headers",))
    (p.dir / "config.yaml").write_text(CONFIG + "flowControl: {}\n")
    with p.run():
        deadline = time.monotonic() + 10
        while any(e["stale"] for e in p.debug()["endpoints"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield p


def samples(p: Picker) -> list:
    text = requests.get(f"http://127.0.0.1:{p.metrics}/metrics", timeout=5).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(found: list, name: str, **labels) -> float:
    return sum(
        s.value
        for s in found
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def one_request(p: Picker, answer: list[bytes], content_type: str) -> str:
    """A completion through the picker and its answer in these chunks; the endpoint chosen."""
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 3, "stream": True}
    head = ec.headers(extra={"x-gateway-inference-fairness-id": FAIRNESS})
    chunks = [ec.response_body(c, eos=i == len(answer) - 1) for i, c in enumerate(answer)]
    out = await ec.exchange(
        p.target,
        [head, ec.body(body), ec.response_headers(200, content_type), *chunks],
    )
    # the primary first, then the fallbacks
    return ec.set_headers(out[0])["x-gateway-destination-endpoint"].split(",")[0]


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


STREAM = [
    event({"choices": [{"text": "a"}]}),
    event({"choices": [{"text": "b"}]}),
    event({"choices": [{"text": "c"}]}),
    event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    + b"data: [DONE]\n\n",
]


async def test_one_request_records_sizes_latency_attempts_and_its_flow(picker):
    before = samples(picker)
    model = {"model_name": MODEL, "target_model_name": MODEL}
    chosen = await one_request(picker, STREAM, "text/event-stream")
    after = samples(picker)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("inference_objective_request_total", priority="0", **model) == 1
    assert grew("llm_d_epp_request_total", priority="0", **model) == 1  # llm-d's name
    assert grew("inference_objective_request_sizes_count", **model) == 1
    assert grew("inference_objective_request_sizes_sum", **model) > 50  # the JSON body
    assert grew("inference_objective_response_sizes_sum", **model) == sum(map(len, STREAM))
    assert grew("inference_objective_request_ttft_seconds_count", **model) == 1
    assert 0 < grew("inference_objective_request_ttft_seconds_sum", **model) < 10
    # the picker's own part ends when the request goes on, before the answer's first byte
    processing = "llm_d_epp_request_processing_duration_seconds"
    assert grew(processing + "_count") == 1
    ttft = grew("inference_objective_request_ttft_seconds_sum", **model)
    assert 0 < grew(processing + "_sum") <= ttft
    # streamed with 3 output tokens: one TPOT observation, of (last - first) / 2
    assert grew("inference_objective_request_tpot_seconds_count", **model) == 1
    assert grew("llm_d_epp_request_streaming_tpot_seconds_count", **model) == 1
    # each gap between the 4 chunks once; the gaps add up to (last - first) = TPOT × 2
    itl = "llm_d_epp_request_streaming_itl_seconds"
    assert grew(itl + "_count", **model) == len(STREAM) - 1
    tpot = grew("inference_objective_request_tpot_seconds_sum", **model)
    assert grew(itl + "_sum", **model) == pytest.approx(2 * tpot, rel=1e-6, abs=1e-9)
    port = chosen.rpartition(":")[2]
    attempt = {"status": "success", "target_model_name": MODEL, "port": port}
    assert grew("inference_extension_scheduler_attempts_total", pod_name="sims", **attempt) == 1
    assert grew("llm_d_epp_scheduler_attempts_total", endpoint_name="sims", **attempt) == 1
    flow = {"fairness_id": FAIRNESS, "priority": "0", "inference_pool": "pool", **model}
    waited = "inference_extension_flow_control_request_queue_duration_seconds_count"
    assert grew(waited, outcome="Dispatched", **flow) == 1  # the reference's outcome name
    left = {"outcome": "Dispatched", "priority": "0", "inference_pool": "pool"}
    assert grew("llm_d_epp_flow_control_requests_total", **left) == 1


def test_the_pool_and_its_pods_are_read_when_scraped(picker):
    found = samples(picker)
    pods = {
        s.labels["model_server_pod"]: s.value
        for s in found
        if s.name == "inference_pool_per_pod_queue_size"
    }
    assert len(pods) == len(picker.addresses) and all(v >= 0 for v in pods.values())
    kv = [s for s in found if s.name == "infergate_epp_pod_kv_cache_utilization"]
    assert {s.labels["name"] for s in kv} == {"pool"} and len(kv) == len(pods)
    assert len([s for s in found if s.name == "llm_d_epp_per_endpoint_queue_size"]) == len(pods)
    saturation = [s for s in found if s.name == "inference_extension_flow_control_pool_saturation"]
    assert [s.labels for s in saturation] == [{"inference_pool": "pool"}]
    assert 0 <= saturation[0].value
    running = [s for s in found if s.name == "inference_pool_average_running_requests"]
    assert [s.labels for s in running] == [{"name": "pool"}]
    spread = [s for s in found if s.name == "llm_d_epp_std_dev_queue_size"]
    assert [s.labels for s in spread] == [{"name": "pool"}] and spread[0].value >= 0
