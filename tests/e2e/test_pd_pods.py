"""A prefill/decode Model with a KV connector, end to end in standalone mode: the decode pod
runs the connector sidecar on its serving port 8000 in front of its engine on 8200 (two
processes on one pod address), and a request sent to the decode pod with
x-prefiller-host-port runs its prefill leg on the prefill pod and its decode leg on the
local engine, which pulls the KV (the simulator's NixlConnector)."""

from __future__ import annotations

import json

import aiohttp
import pytest
import yaml

from infergw.cluster.store import MODEL, POD
from infergw.controllers.app import Standalone
from tests.e2e.metrics import Metrics
from tests.e2e.standalone_helpers import sim_model, wait_for_cluster

pytestmark = pytest.mark.slow


def kv_transfer(role: str) -> str:
    return "--kv-transfer-config=" + json.dumps({"kv_connector": "NixlConnector", "kv_role": role})


def model() -> dict:
    backend = {
        "prefill": {"replicas": 1, "args": [kv_transfer("kv_producer")]},
        "decode": {"replicas": 1, "args": [kv_transfer("kv_consumer")]},
        "kvConnector": {"type": "nixl"},
    }
    return sim_model("pd", backend=backend)


def ready(pod: dict) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def scrape(session: aiohttp.ClientSession, url: str) -> Metrics:
    async with session.get(url) as r:
        assert r.status == 200, url
        return Metrics(await r.text())


async def test_the_decode_pod_serves_through_its_connector_and_runs_two_legs(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "model.yaml").write_text(yaml.safe_dump(model()))
    app = await Standalone(manifests, tmp_path / "state", tmp_path / "pool.yaml").start()
    store = app.store
    try:

        async def ready_group():
            m = await store.get(MODEL, "default", "pd")
            return (m.get("status") or {}).get("readyReplicas") == 1

        await wait_for_cluster(ready_group, "a ready serving group")
        pods = {}
        for role in ("prefill", "decode"):
            (pod,) = (await store.list(POD, "default", {"infergate.io/role": role}))[0]
            pods[role] = pod
        decode = pods["decode"]
        assert [c["name"] for c in decode["status"]["containerStatuses"]] == [
            "engine",
            "connector",
        ]
        assert all(c["ready"] for c in decode["status"]["containerStatuses"])
        assert len(pods["prefill"]["status"]["containerStatuses"]) == 1
        d_ip, p_ip = decode["status"]["podIP"], pods["prefill"]["status"]["podIP"]
        assert d_ip != p_ip

        # what the picker is told: the pool's one target port, 8000, on every pod's address;
        # the sidecar calls a prefill pod only once the pool file says it is ready
        async def exported():
            path = tmp_path / "pool.yaml"
            docs = list(yaml.safe_load_all(path.read_text())) if path.exists() else []
            ips = {d["status"].get("podIP") for d in docs if d["kind"] == "Pod" and ready(d)}
            return docs if ips == {d_ip, p_ip} else None

        docs = await wait_for_cluster(exported, "the pool file to name both pods")
        (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            connector = f"http://{d_ip}:8000"
            # port 8000 is the sidecar: its own metrics, and the engine's passed through
            own_before = await scrape(s, f"{connector}/connector/metrics")
            assert "infergate_connector_requests_total" in own_before
            engine_before = await scrape(s, f"{connector}/metrics")
            assert "vllm:num_requests_running" in engine_before
            # and the engine itself answers on 8200, on the same pod address
            async with s.get(f"http://{d_ip}:8200/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "tiny"
            prefill_before = await scrape(s, f"http://{p_ip}:8000/metrics")

            prompt = "The decode pod pulls the KV of this prompt from the prefill pod. " * 8
            async with s.post(
                f"{connector}/v1/completions",
                json={"model": "tiny", "prompt": prompt, "max_tokens": 6},
                headers={"x-prefiller-host-port": f"{p_ip}:8000"},
            ) as r:
                body = await r.text()
                assert r.status == 200, body
                answer = json.loads(body)
            assert answer["choices"][0]["text"]
            assert answer["usage"]["completion_tokens"] == 6
            prompt_tokens = answer["usage"]["prompt_tokens"]
            # the KV came from the prefill pod: all but the last prompt token were pulled
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1

            # the sidecar ran it as two legs: one disaggregated request, one prefill leg
            own = await scrape(s, f"{connector}/connector/metrics")
            requests = "infergate_connector_requests_total"
            assert own(requests, mode="disaggregated", connector="nixl") == 1
            assert own("infergate_connector_prefill_duration_seconds_count") == 1
            assert own("infergate_connector_prefill_failures_total") == 0
            errors = "infergate_connector_errors_total"  # (readiness probes that came early)
            assert own(errors) == own_before(errors), [
                (e.labels, e.value) for e in own.samples if e.name == errors
            ]
            # the prefill pod served the one-token prefill leg ...
            success = "vllm:request_success_total"
            prefill_after = await scrape(s, f"http://{p_ip}:8000/metrics")
            assert prefill_after(success) == prefill_before(success) + 1
            assert prefill_after(success, finished_reason="length") >= 1
            # ... and the local engine the decode leg, with one KV pull from it
            engine_after = await scrape(s, f"http://{d_ip}:8200/metrics")
            assert engine_after(success) == engine_before(success) + 1
            assert engine_after("vllm:nixl_xfer_time_seconds_count") == 1
            assert engine_after("vllm:nixl_num_failed_transfers_total") == 0
            assert "vllm:nixl_num_failed_transfers_total" in engine_after
            # each leg reached a pod of its role, and the prefill pod no longer holds the KV
            for m, role in ((prefill_after, "prefill"), (engine_after, "decode")):
                held = [s for s in m.samples if s.name == "infergate_sim:kv_held_requests"]
                assert [(s.labels["role"], s.value) for s in held] == [(role, 0)]
                assert "infergate_sim:kv_role_mismatch_total" in m
                assert m("infergate_sim:kv_role_mismatch_total") == 0
    finally:
        await app.stop()
