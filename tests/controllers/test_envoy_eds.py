"""Standalone mode's EDS file for the local Envoy: which pods of a pool become endpoints,
how readiness shows, and that the exporter rewrites the file only when it changes."""

from __future__ import annotations

import json

from infergw.cluster.pool import HOST_PORTS_ANNOTATION
from infergw.cluster.store import INFERENCE_POOL, POD
from infergw.controllers.envoy_eds import discovery_response, pool_endpoints
from infergw.controllers.exporter import PoolExporter
from infergw.controllers.memory_store import MemoryStore

POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "tiny", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "tiny"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "endpointPickerRef": {"name": "tiny-epp", "port": {"number": 9002}},
    },
}


def pod(name, ip=None, ready=True, labels=None, namespace="default", deleting=False) -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels or {"app": "tiny"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


def test_only_addressed_selected_live_pods_of_the_namespace_are_endpoints():
    pods = [
        pod("a", "127.0.0.2"),
        pod("b", "127.0.0.3", ready=False),
        pod("no-ip"),
        pod("other", "127.0.0.4", labels={"app": "else"}),
        pod("elsewhere", "127.0.0.5", namespace="prod"),
        pod("going", "127.0.0.6", deleting=True),
    ]
    assert pool_endpoints(POOL, pods) == [
        ("127.0.0.2", 8000, True),
        ("127.0.0.2", 8001, True),
        ("127.0.0.3", 8000, False),
        ("127.0.0.3", 8001, False),
    ]


def test_one_address_pods_are_endpoints_at_their_own_ports(caplog):
    """One-address mode: each pod's target ports where its host-ports annotation moved them
    (a port it does not move stays); a pod whose annotation is unreadable is left out, said."""
    a, b, bad = pod("a", "127.0.0.1"), pod("b", "127.0.0.1"), pod("bad", "127.0.0.1")
    a["metadata"]["annotations"] = {HOST_PORTS_ANNOTATION: "8000=20001,8001=20002"}
    b["metadata"]["annotations"] = {HOST_PORTS_ANNOTATION: "8000=20003"}
    bad["metadata"]["annotations"] = {HOST_PORTS_ANNOTATION: "8000=20004,8000=20005"}
    assert pool_endpoints(POOL, [a, b, bad]) == [
        ("127.0.0.1", 8001, True),
        ("127.0.0.1", 20001, True),
        ("127.0.0.1", 20002, True),
        ("127.0.0.1", 20003, True),
    ]
    assert "ignoring pod bad: annotation infergate.io/host-ports: port 8000 is given twice" in (
        caplog.text
    )


def test_discovery_response_is_an_envoy_cluster_load_assignment():
    doc = json.loads(
        discovery_response("pool", [("127.0.0.2", 8000, True), ("127.0.0.3", 8000, False)])
    )
    (res,) = doc["resources"]
    assert res["@type"] == "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert res["cluster_name"] == "pool"
    lb = res["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in lb] == [
        {"address": "127.0.0.2", "port_value": 8000},
        {"address": "127.0.0.3", "port_value": 8000},
    ]
    assert [e["health_status"] for e in lb] == ["HEALTHY", "UNHEALTHY"]
    empty = json.loads(discovery_response("pool", []))
    assert empty["resources"][0]["endpoints"] == []
    assert empty["version_info"] != doc["version_info"]  # a new version for new content


async def test_the_exporter_keeps_the_eds_file_current(tmp_path):
    store = MemoryStore()
    await store.create(json.loads(json.dumps(POOL)))
    eds = tmp_path / "eds" / "pool.json"
    exporter = PoolExporter(store, tmp_path / "pool.yaml", eds_file=eds, eds_pool="tiny")
    await exporter.write_once()
    assert json.loads(eds.read_text())["resources"][0]["endpoints"] == []
    p = await store.create({**pod("a"), "spec": {"containers": [{"name": "e"}]}})
    p["status"] = pod("a", "127.0.0.2")["status"]
    await store.update_status(p)
    stamp = eds.stat().st_mtime_ns
    await exporter.write_once()
    lb = json.loads(eds.read_text())["resources"][0]["endpoints"][0]["lb_endpoints"]
    assert len(lb) == 2 and eds.stat().st_mtime_ns != stamp
    stamp = eds.stat().st_mtime_ns
    await exporter.write_once()
    assert eds.stat().st_mtime_ns == stamp  # unchanged: not rewritten, Envoy not reloaded
    await store.delete(POD, "default", "a")
    await exporter.write_once()
    assert json.loads(eds.read_text())["resources"][0]["endpoints"] == []
    assert not list(eds.parent.glob(".*.tmp"))


async def test_with_a_directory_every_pool_has_its_own_file_and_cluster(tmp_path):
    """Several Models behind one Envoy: a file per pool, each for the cluster named after it;
    a pool that goes away keeps a file with no endpoints (its cluster stays in Envoy)."""
    store = MemoryStore()
    other = json.loads(json.dumps(POOL))
    other["metadata"]["name"] = "other"
    other["spec"]["selector"]["matchLabels"] = {"app": "other"}
    for obj in (json.loads(json.dumps(POOL)), other):
        await store.create(obj)
    p = await store.create({**pod("a"), "spec": {"containers": [{"name": "e"}]}})
    p["status"] = pod("a", "127.0.0.2")["status"]
    await store.update_status(p)
    exporter = PoolExporter(store, tmp_path / "pool.yaml", eds_dir=tmp_path / "eds")
    await exporter.write_once()

    def assignment(name):
        return json.loads((tmp_path / "eds" / f"{name}.json").read_text())["resources"][0]

    assert assignment("tiny")["cluster_name"] == "tiny"
    assert len(assignment("tiny")["endpoints"][0]["lb_endpoints"]) == 2
    assert assignment("other")["cluster_name"] == "other" and assignment("other")["endpoints"] == []
    await store.delete(INFERENCE_POOL, "default", "tiny")
    await exporter.write_once()
    assert assignment("tiny")["endpoints"] == []
