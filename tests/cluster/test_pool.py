"""cluster/pool.py: an InferencePool read through api, and which pods (and ports) are its
members."""

from __future__ import annotations

import pytest

from infergw.api.names import ENGINE_LABEL, ENTRY_LABEL, ROLE_LABEL
from infergw.cluster.pool import (
    ACTIVE_PORTS_ANNOTATION,
    PoolError,
    PoolSpec,
    find_pool,
    members,
    pod_problem,
)


def pool_object(**spec_overrides) -> dict:
    spec = {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": "ns"},
        "spec": spec,
    }


# ---- PoolSpec.from_object -----------------------------------------------------------------


def test_pool_spec_from_a_v1_object():
    obj = pool_object(
        targetPorts=[{"number": 8000}, {"number": 8002}],
        appProtocol="kubernetes.io/h2c",
        endpointPickerRef={"name": "my-epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
    )
    spec = PoolSpec.from_object(obj)
    assert spec.name == "pool"
    assert spec.namespace == "ns"
    assert spec.selector == {"app": "vllm"}
    assert spec.target_ports == [8000, 8002]
    assert spec.app_protocol == "kubernetes.io/h2c"
    assert spec.failure_mode == "FailOpen"
    assert spec.picker_service == "my-epp"


def test_pool_spec_defaults():
    obj = pool_object()
    del obj["spec"]["endpointPickerRef"]
    del obj["metadata"]["namespace"]
    spec = PoolSpec.from_object(obj)
    assert spec.namespace == "default"
    assert spec.app_protocol == "http"
    assert spec.failure_mode == "FailClose"
    assert spec.picker_service is None


def test_pool_selector_values_become_strings():
    spec = PoolSpec.from_object(pool_object(selector={"matchLabels": {"tier": 1}}))
    assert spec.selector == {"tier": "1"}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"selector": None}, "selector"),
        ({"selector": {}}, "selector"),
        ({"selector": {"matchLabels": {}}}, "selector"),
        ({"selector": {"matchLabels": ["app"]}}, "selector"),
        ({"selector": {"app": "vllm"}}, "selector"),  # the legacy flat selector
        ({"targetPorts": None}, "targetPorts"),
        ({"targetPorts": []}, "targetPorts"),
        ({"targetPorts": [{"number": 0}]}, "targetPorts"),
        ({"targetPorts": [{"number": 65536}]}, "targetPorts"),
        ({"targetPorts": [{"number": "8000"}]}, "targetPorts"),
        ({"targetPorts": [{}]}, "targetPorts"),
        ({"targetPorts": [{"number": 8000}, {"number": 8000}]}, "duplicate port"),
        ({"targetPorts": [{"number": 8000 + i} for i in range(9)]}, r"1\.\.8"),
        ({"endpointPickerRef": {"name": "e", "failureMode": "FailSometimes"}}, "failureMode"),
    ],
)
def test_pool_spec_validation_errors(overrides, words):
    with pytest.raises(ValueError, match=words) as info:
        PoolSpec.from_object(pool_object(**overrides))
    assert "pool" in str(info.value)  # names the pool


def test_eight_unique_ports_are_allowed():
    spec = PoolSpec.from_object(pool_object(targetPorts=[{"number": 8000 + i} for i in range(8)]))
    assert len(spec.target_ports) == 8


def test_pool_spec_from_an_empty_object_is_an_error():
    with pytest.raises(ValueError):
        PoolSpec.from_object({})


def test_what_the_picker_does_not_act_on_leaves_the_pool_usable():
    """api's CRD rules that name fields the picker does not read (a picker Service without a
    port, another appProtocol) do not refuse the pool: files and clusters set up before the pool
    was read through api keep working."""
    spec = PoolSpec.from_object(pool_object(appProtocol="h3", endpointPickerRef={"name": "e"}))
    assert spec.app_protocol == "h3" and spec.picker_service == "e"


def test_the_alpha_group_is_read_with_v1_shape():
    obj = {**pool_object(), "apiVersion": "inference.networking.x-k8s.io/v1alpha2"}
    assert PoolSpec.from_object(obj).target_ports == [8000]


@pytest.mark.parametrize("obj", [None, [], "pool", {"kind": "InferencePool"}])
def test_what_is_no_pool_object_is_a_pool_error(obj):
    with pytest.raises(PoolError):
        PoolSpec.from_object(obj)


# ---- members --------------------------------------------------------------------------------

POOL = PoolSpec("pool", "ns", {"app": "vllm"}, [8000, 8001])


def pod(name, ip="10.0.0.1", *, ready=True, labels=None, **meta) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "vllm", **(labels or {})}, **meta},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_members_are_matching_pods_with_an_address_times_target_ports():
    pods = [
        pod("b", "10.0.0.2", labels={ROLE_LABEL: "prefill", ENGINE_LABEL: "sglang"}, uid="u-b"),
        pod("a", "fd00::1"),
        pod("other", "10.0.0.9", labels={"app": "x"}),
        pod("no-ip", None),
    ]
    got = members(POOL, pods)
    assert [(m.pod, m.address, m.rank, m.port) for m in got] == [
        ("a", "[fd00::1]:8000", 0, 8000),
        ("a", "[fd00::1]:8001", 1, 8001),
        ("b", "10.0.0.2:8000", 0, 8000),
        ("b", "10.0.0.2:8001", 1, 8001),
    ]
    b = got[2]
    assert (b.role, b.engine, b.pod_uid, b.ready) == ("prefill", "sglang", "u-b", True)
    assert (got[0].role, got[0].engine, got[0].pod_uid) == (None, "vllm", "")


def test_not_ready_and_terminating_pods_are_members_that_are_not_ready():
    pods = [
        pod("a", ready=False),
        pod("b", "10.0.0.2", deletionTimestamp="2026-01-01T00:00:00Z"),
        pod("c", "10.0.0.3"),
    ]
    assert {m.pod: m.ready for m in members(POOL, pods)} == {"a": False, "b": False, "c": True}


def test_a_modelinfer_worker_is_never_a_member_even_when_selected():
    """A hand-written ModelInfer's worker template may carry the pool's labels (it falls back
    to the entry's): the worker serves nothing, so it is no member; its entry is."""
    pods = [
        pod("entry", labels={ENTRY_LABEL: "true"}),
        pod("worker", "10.0.0.2", labels={ENTRY_LABEL: "false"}),
        pod("plain", "10.0.0.3"),
    ]
    assert {m.pod for m in members(POOL, pods)} == {"entry", "plain"}


def test_the_active_ports_annotation_narrows_a_pods_ports_but_keeps_their_rank():
    annotated = pod("a", annotations={ACTIVE_PORTS_ANNOTATION: "8001, x, 9999"})
    assert [(m.port, m.rank) for m in members(POOL, [annotated])] == [(8001, 1)]


def test_find_pool_takes_the_named_pool_and_the_namespaces_pods():
    objects = [
        {**pool_object(), "metadata": {"name": "other", "namespace": "ns"}},
        pool_object(),
        {**pod("a"), "kind": "Pod", "metadata": {"name": "a", "namespace": "ns"}},
        {**pod("b"), "kind": "Pod", "metadata": {"name": "b", "namespace": "elsewhere"}},
    ]
    pool, pods = find_pool(objects, "pool", "ns")
    assert pool is objects[1] and [p["metadata"]["name"] for p in pods] == ["a"]
    assert find_pool(objects, "missing", "ns")[0] is None
    with pytest.raises(PoolError, match="unsupported apiVersion"):
        find_pool([{**pool_object(), "apiVersion": "example.com/v1"}], "pool", "ns")


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"metadata": {"name": "a", "labels": {"app": 1}}}, "labels"),
        ({"metadata": {"name": "a"}, "status": {"podIP": "pods.example.com"}}, "podIP"),
        ({"metadata": {}}, "metadata.name"),
        ({"metadata": {"name": "a"}, "status": {"conditions": ["Ready"]}}, "conditions"),
        ([1], "object"),
    ],
)
def test_pod_problem_names_what_is_wrong(bad, words):
    assert words in (pod_problem(bad) or "")
    assert pod_problem(pod("fine")) is None
