"""epp/datastore.py: the InferencePool, its endpoints (ready pods × target ports), live state."""

from __future__ import annotations

import copy

import pytest

from infergw.api.names import ENGINE_LABEL
from infergw.cluster.pool import ACTIVE_PORTS_ANNOTATION, HOST_PORTS_ANNOTATION
from infergw.epp.datastore import Datastore, Endpoint, EndpointMetrics, PoolSpec


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    labels: dict | None = None,
    ready: bool = True,
    terminating: bool = False,
    annotations: dict | None = None,
) -> dict:
    meta: dict = {"name": name, "namespace": "ns", "labels": {"app": "vllm", **(labels or {})}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if annotations:
        meta["annotations"] = annotations
    status: dict = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def store(ports=(8000,), *pods, host_ports: bool = False) -> Datastore:
    ds = Datastore(host_ports=host_ports)
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, list(ports)))
    ds.replace_pods(list(pods))
    return ds


def addresses(ds: Datastore) -> list[str]:
    return sorted(e.address for e in ds.endpoints())


# ---- which pods become endpoints ----------------------------------------------------------


def test_ready_matching_pods_become_endpoints():
    ds = store((8000,), pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    a = ds.endpoint("10.0.0.1:8000")
    assert a is not None
    assert (a.name, a.pod, a.ip) == ("a-rank-0", "a", "10.0.0.1")


@pytest.mark.parametrize(
    "bad",
    [
        pod("x", ready=False),
        pod("x", terminating=True),
        pod("x", ip=None),
        pod("x", labels={"app": "other"}),
        {"metadata": {"name": "x", "labels": {"app": "vllm"}}, "status": {"podIP": "10.0.0.9"}},
    ],
    ids=["not-ready", "terminating", "no-ip", "selector-mismatch", "no-conditions"],
)
def test_pods_that_cannot_serve_are_not_endpoints(bad):
    ds = store((8000,), bad, pod("ok", "10.0.0.1"))
    assert addresses(ds) == ["10.0.0.1:8000"]


def test_selector_needs_every_label():
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm", "model": "llama"}, [8000]))
    ds.replace_pods(
        [pod("only-app", "10.0.0.1"), pod("both", "10.0.0.2", labels={"model": "llama"})]
    )
    assert addresses(ds) == ["10.0.0.2:8000"]


def test_each_target_port_is_one_endpoint_named_by_rank():
    ds = store((8000, 8002, 8004), pod("p", "10.0.0.1"))
    names = {e.address: e.name for e in ds.endpoints()}
    assert names == {
        "10.0.0.1:8000": "p-rank-0",
        "10.0.0.1:8002": "p-rank-1",
        "10.0.0.1:8004": "p-rank-2",
    }
    assert {e.pod for e in ds.endpoints()} == {"p"}


def test_active_ports_annotation_limits_the_ports():
    annotated = pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "8000, 8004"})
    ds = store((8000, 8002, 8004), annotated, pod("q", "10.0.0.2"))
    assert addresses(ds) == [
        "10.0.0.1:8000",
        "10.0.0.1:8004",
        "10.0.0.2:8000",
        "10.0.0.2:8002",
        "10.0.0.2:8004",
    ]


def test_active_ports_outside_the_pool_are_ignored():
    annotated = pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "9999,8002,x"})
    ds = store((8000, 8002), annotated)
    assert addresses(ds) == ["10.0.0.1:8002"]


def test_empty_active_ports_annotation_means_all_ports():
    annotated = pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: ""})
    assert addresses(store((8000, 8002), annotated)) == ["10.0.0.1:8000", "10.0.0.1:8002"]


def test_rank_is_the_index_in_target_ports_even_with_active_ports():
    annotated = pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "8002"})
    ds = store((8000, 8002), annotated)
    assert ds.endpoint("10.0.0.1:8002").name == "p-rank-1"


def test_endpoint_names_stay_unique_when_active_ports_change():
    ds = store((8000, 8002), pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "8002"}))
    ds.upsert_pod(pod("p", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "8000,8002"}))
    names = [e.name for e in ds.endpoints()]
    assert len(names) == len(set(names)) == 2


def test_engine_type_comes_from_the_pod_label():
    ds = store((8000,), pod("a", "10.0.0.1", labels={ENGINE_LABEL: "sglang"}), pod("b", "10.0.0.2"))
    assert ds.endpoint("10.0.0.1:8000").engine == "sglang"
    assert ds.endpoint("10.0.0.2:8000").engine == "vllm"


def test_endpoint_labels_are_the_pods():
    ds = store((8000,), pod("a", "10.0.0.1", labels={"zone": "z1"}))
    assert ds.endpoint("10.0.0.1:8000").labels == {"app": "vllm", "zone": "z1"}


def test_no_pool_means_no_endpoints():
    ds = Datastore()
    ds.replace_pods([pod("a")])
    assert ds.endpoints() == []
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000]))
    assert addresses(ds) == ["10.0.0.1:8000"]
    ds.set_pool(None)
    assert ds.endpoints() == []


def test_pool_change_rebuilds_endpoints():
    ds = store((8000,), pod("a", "10.0.0.1"))
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [9000, 9001]))
    assert addresses(ds) == ["10.0.0.1:9000", "10.0.0.1:9001"]


def test_pods_without_a_matching_selector_after_pool_change():
    ds = store((8000,), pod("a", "10.0.0.1"))
    ds.set_pool(PoolSpec("pool", "ns", {"app": "sglang"}, [8000]))
    assert ds.endpoints() == []


def test_upsert_and_delete_pods():
    ds = store((8000,))
    ds.upsert_pod(pod("a", "10.0.0.1"))
    ds.upsert_pod(pod("b", "10.0.0.2"))
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    ds.upsert_pod(pod("a", "10.0.0.1", ready=False))
    assert addresses(ds) == ["10.0.0.2:8000"]
    ds.delete_pod("b")
    assert ds.endpoints() == []
    ds.delete_pod("never-existed")  # harmless


def test_replace_pods_drops_the_pods_not_listed():
    ds = store((8000,), pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
    ds.replace_pods([pod("c", "10.0.0.3")])
    assert addresses(ds) == ["10.0.0.3:8000"]


def test_version_counts_rebuilds():
    ds = Datastore()
    v0 = ds.version
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000]))
    ds.upsert_pod(pod("a"))
    ds.delete_pod("a")
    assert ds.version == v0 + 3


def test_ready_endpoints_are_the_reachable_ones():
    ds = store((8000,), pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
    ds.endpoint("10.0.0.1:8000").reachable = False
    assert [e.address for e in ds.ready_endpoints()] == ["10.0.0.2:8000"]
    assert len(ds.endpoints()) == 2


def test_lookup_of_an_unknown_address():
    assert store((8000,), pod("a")).endpoint("10.9.9.9:8000") is None


# ---- live state across rebuilds -----------------------------------------------------------


def test_live_state_survives_a_rebuild():
    ds = store((8000,), pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
    ep = ds.endpoint("10.0.0.1:8000")
    ep.metrics = EndpointMetrics(waiting=3, updated_at=1.0)
    ep.stale = False
    ep.inflight_requests = 2
    ep.inflight_tokens = 500
    ep.ttft_ewma = 0.3
    ep.models = frozenset({"m"})
    ds.upsert_pod(pod("a", "10.0.0.1", labels={"zone": "z2", ENGINE_LABEL: "sglang"}))
    ds.delete_pod("b")
    same = ds.endpoint("10.0.0.1:8000")
    assert same is ep
    assert same.metrics.waiting == 3
    assert not same.stale
    assert (same.inflight_requests, same.inflight_tokens, same.ttft_ewma) == (2, 500, 0.3)
    assert same.models == frozenset({"m"})
    # ...while what the pod says is refreshed.
    assert same.labels["zone"] == "z2"
    assert same.engine == "sglang"


def test_a_pod_that_leaves_and_returns_starts_fresh():
    ds = store((8000,), pod("a", "10.0.0.1"))
    ds.endpoint("10.0.0.1:8000").inflight_requests = 5
    ds.upsert_pod(pod("a", "10.0.0.1", ready=False))
    ds.upsert_pod(pod("a", "10.0.0.1"))
    ep = ds.endpoint("10.0.0.1:8000")
    assert ep.inflight_requests == 0
    assert ep.stale  # never scraped


def test_pod_objects_are_not_mutated():
    original = pod("a", "10.0.0.1", annotations={ACTIVE_PORTS_ANNOTATION: "8000"})
    snapshot = copy.deepcopy(original)
    store((8000, 8002), original)
    assert original == snapshot


def test_a_recycled_ip_belongs_to_the_new_pod():
    ds = store((8000,), pod("old", "10.0.0.1"))
    ds.replace_pods([pod("new", "10.0.0.1")])
    ep = ds.endpoint("10.0.0.1:8000")
    assert (ep.name, ep.pod) == ("new-rank-0", "new")


def test_a_pod_made_again_under_its_name_and_ip_is_a_new_endpoint():
    """A StatefulSet pod is deleted and made again with the same name; it may get the same
    IP. Its uid differs: nothing the old one held or reported is the new one's."""
    first = pod("a", "10.0.0.1")
    first["metadata"]["uid"] = "uid-1"
    ds = store((8000,), first)
    old = ds.endpoint("10.0.0.1:8000")
    old.inflight_requests = 4
    gone = []
    ds.removal_listeners.append(gone.append)
    again = pod("a", "10.0.0.1")
    again["metadata"]["uid"] = "uid-2"
    ds.replace_pods([again])
    new = ds.endpoint("10.0.0.1:8000")
    assert new is not old and new.pod_uid == "uid-2" and new.inflight_requests == 0
    assert gone == ["10.0.0.1:8000"]


def test_ipv6_pod_address_is_bracketed():
    ds = store((8000,), pod("a", "fd00::1"))
    (ep,) = ds.endpoints()
    assert ep.address == "[fd00::1]:8000"


# ---- Endpoint -----------------------------------------------------------------------------


def test_endpoint_defaults():
    ep = Endpoint(name="p-rank-0", pod="p", address="10.1.2.3:8000")
    assert ep.ip == "10.1.2.3"
    assert ep.stale  # not scraped yet: treated as saturated
    assert ep.reachable
    assert ep.models is None
    assert (ep.inflight_requests, ep.inflight_tokens) == (0, 0)
    assert ep.metrics_age() == float("inf")


def test_metrics_age():
    ep = Endpoint(name="p", pod="p", address="1.2.3.4:80")
    ep.metrics.updated_at = 100.0
    assert ep.metrics_age(now=102.5) == 2.5


def test_pool_files_move_each_pods_ports_by_its_host_ports_annotation(caplog):
    """One-address mode: every pod on 127.0.0.1, each reached at its own ports; the endpoint
    knows where its other ports (KV events) went too, and is keyed by its pod."""
    a = pod("a", "127.0.0.1", annotations={HOST_PORTS_ANNOTATION: "8000=20001,5557=20002"})
    b = pod("b", "127.0.0.1", annotations={HOST_PORTS_ANNOTATION: "8000=20003,5557=20004"})
    bad = pod("c", "127.0.0.1", annotations={HOST_PORTS_ANNOTATION: "8000"})
    ds = store((8000,), a, b, bad, host_ports=True)
    assert {e.address: e.pod for e in ds.endpoints()} == {
        "127.0.0.1:20001": "a",
        "127.0.0.1:20003": "b",
    }
    assert ds.endpoint("127.0.0.1:20003").host_ports.of(5557) == 20004
    assert ds.has_member("a", 20001) and not ds.has_member("a", 20003)
    assert "ignoring pod c: annotation infergate.io/host-ports" in caplog.text
    # a cluster's pods have their own IPs: the annotation moves nothing there
    a_ip = pod("a", "10.0.0.1", annotations={HOST_PORTS_ANNOTATION: "8000=20001"})
    assert addresses(store((8000,), a_ip)) == ["10.0.0.1:8000"]
