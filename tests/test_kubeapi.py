"""The API emulator (tests/kubeapi.py) works for the official kubernetes client."""

from __future__ import annotations

import json
import threading
import time

import aiohttp
import pytest
from kubernetes import client, watch
from kubernetes.client import ApiException

from tests.kubeapi import KubeAPIEmulator

GROUP, VERSION, PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
POOL_API = f"{GROUP}/{VERSION}"


def pod(name: str, labels: dict | None = None, ns: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "vllm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
    }


def pool(name: str = "llama", port: int = 8000) -> dict:
    return {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": port}]},
    }


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


@pytest.fixture
def api():
    with KubeAPIEmulator().threaded() as emulator:
        yield emulator


@pytest.fixture
def api_client(api):
    with client.ApiClient(api.client_configuration()) as c:
        yield c


@pytest.fixture
def core(api_client):
    return client.CoreV1Api(api_client)


@pytest.fixture
def custom(api_client):
    return client.CustomObjectsApi(api_client)


def test_pod_crud(core):
    created = core.create_namespaced_pod("default", pod("p1"))
    meta = created.metadata
    assert meta.namespace == "default" and meta.uid and meta.creation_timestamp
    assert int(meta.resource_version) > 0 and meta.generation == 1
    assert core.read_namespaced_pod("p1", "default").metadata.uid == meta.uid

    body = core.read_namespaced_pod("p1", "default")
    body.metadata.labels["tier"] = "gpu"
    replaced = core.replace_namespaced_pod("p1", "default", body)
    assert int(replaced.metadata.resource_version) > int(meta.resource_version)
    assert replaced.metadata.labels == {"app": "vllm", "tier": "gpu"}

    patched = core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"tier": None}}})
    assert patched.metadata.labels == {"app": "vllm"}
    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["p1"]

    core.delete_namespaced_pod("p1", "default")
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_pod("p1", "default")
    assert exc.value.status == 404
    assert status_of(exc.value) | {"message": ""} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "",
        "reason": "NotFound",
        "code": 404,
    }


def test_conflicts(core):
    core.create_namespaced_pod("default", pod("p1"))
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_pod("default", pod("p1"))
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "AlreadyExists"

    stale = core.read_namespaced_pod("p1", "default")
    core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_pod("p1", "default", stale)
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "Conflict"


def test_label_selectors_and_cluster_wide_lists(core):
    core.create_namespaced_pod("default", pod("a", {"app": "vllm", "tier": "gpu"}))
    core.create_namespaced_pod("default", pod("b", {"app": "vllm", "tier": "cpu"}))
    core.create_namespaced_pod("default", pod("c", {"app": "other"}))
    core.create_namespaced_pod("team", pod("d", {"app": "vllm"}))

    def names(result) -> list[str]:
        return [p.metadata.name for p in result.items]

    assert names(core.list_namespaced_pod("default", label_selector="app=vllm")) == ["a", "b"]
    assert names(core.list_namespaced_pod("default", label_selector="app=vllm,tier=cpu")) == ["b"]
    assert names(core.list_namespaced_pod("default", label_selector="app!=vllm")) == ["c"]
    assert names(core.list_pod_for_all_namespaces(label_selector="app==vllm")) == ["a", "b", "d"]
    listed = core.list_namespaced_pod("default", resource_version="0")
    assert int(listed.metadata.resource_version) == 5  # 1 is the empty store
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_pod("default", label_selector="app in (a,b)")
    assert exc.value.status == 400 and status_of(exc.value)["reason"] == "BadRequest"


def test_custom_objects_and_status_subresource(api, custom):
    args = (GROUP, VERSION, "default", PLURAL)
    created = custom.create_namespaced_custom_object(*args, pool())
    assert created["metadata"]["generation"] == 1
    got = custom.get_namespaced_custom_object(*args, "llama")
    assert got["spec"]["targetPorts"] == [{"number": 8000}]

    accepted = {
        "type": "Accepted",
        "status": "True",
        "reason": "Accepted",
        "message": "",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    gateway = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gateway"}
    parent = {"parentRef": gateway, "conditions": [accepted]}
    status = {"status": {"parents": [parent]}}
    after_status = custom.patch_namespaced_custom_object_status(*args, "llama", status)
    assert after_status["metadata"]["generation"] == 1  # status writes leave generation alone

    patched = custom.patch_namespaced_custom_object(
        *args, "llama", {"spec": {"targetPorts": [{"number": 8001}]}, "status": None}
    )
    assert patched["metadata"]["generation"] == 2
    assert patched["status"] == status["status"]  # the object endpoint keeps the status

    got["spec"]["targetPorts"] = [{"number": 9000}]
    with pytest.raises(ApiException) as exc:  # got is stale by now
        custom.replace_namespaced_custom_object(*args, "llama", got)
    assert exc.value.status == 409

    custom.create_namespaced_custom_object(GROUP, VERSION, "team", PLURAL, pool("other"))
    everywhere = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert [p["metadata"]["name"] for p in everywhere["items"]] == ["llama", "other"]
    assert everywhere["kind"] == "InferencePoolList"
    assert api.get(POOL_API, "InferencePool", "other", "team")["spec"]["targetPorts"]

    custom.delete_namespaced_custom_object(*args, "llama")
    assert custom.list_namespaced_custom_object(*args)["items"] == []


def test_watch_sees_changes_in_order(core):
    start = core.list_namespaced_pod("default").metadata.resource_version
    seen: list[tuple[str, str, dict]] = []
    w = watch.Watch()

    def consume() -> None:
        for event in w.stream(
            core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=5
        ):
            obj = event["object"]
            seen.append((event["type"], obj.metadata.name, dict(obj.metadata.labels or {})))
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.2)
    core.create_namespaced_pod("default", pod("p1"))
    core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"v": "2"}}})
    core.delete_namespaced_pod("p1", "default")
    thread.join(5)
    assert not thread.is_alive()
    assert seen == [
        ("ADDED", "p1", {"app": "vllm"}),
        ("MODIFIED", "p1", {"app": "vllm", "v": "2"}),
        ("DELETED", "p1", {"app": "vllm", "v": "2"}),
    ]


def test_filtered_watch_and_timeout(api, core, custom):
    start = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("in"))
    core.create_namespaced_pod("default", pod("out", {"app": "other"}))
    core.patch_namespaced_pod("in", "default", {"metadata": {"labels": {"app": "gone"}}})
    began = time.monotonic()
    events = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            label_selector="app=vllm",
            resource_version=start,
            timeout_seconds=1,
        )
    ]
    assert 1 <= time.monotonic() - began < 3
    # Leaving the selector is reported as DELETED, as kube-apiserver's watch cache does.
    assert events == [("ADDED", "in"), ("DELETED", "in")]

    # Without a resourceVersion a watch starts with what exists.
    api.put({**pool(), "metadata": {"name": "llama", "namespace": "default"}})
    raw = [
        (e["type"], e["object"]["metadata"]["name"])
        for e in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            PLURAL,
            timeout_seconds=1,
        )
    ]
    assert raw == [("ADDED", "llama")]


def test_watch_from_expired_version_gets_410(api, core):
    start = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("p1"))
    api.expire_history()
    # With timeout_seconds the client does not retry: it raises the ERROR event as ApiException.
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(
            core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=2
        ):
            pass
    assert exc.value.status == 410
    # Without it, the client retries once from the same version, then raises just the same.
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=start):
            pass
    assert exc.value.status == 410
    # On the wire: HTTP 200 and one ERROR event carrying a Status.
    resp = core.list_namespaced_pod(
        "default", watch=True, resource_version=start, _preload_content=False
    )
    lines = resp.data.decode().splitlines()
    assert resp.status == 200 and len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    # A watch from the current version is fine.
    now = core.list_namespaced_pod("default").metadata.resource_version
    assert (
        list(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=now, timeout_seconds=1
            )
        )
        == []
    )


def test_history_is_bounded():
    with KubeAPIEmulator(history=3).threaded() as api:
        for i in range(5):
            api.put(pod(f"p{i}"))
        with client.ApiClient(api.client_configuration()) as c:
            core = client.CoreV1Api(c)
            with pytest.raises(ApiException) as exc:
                list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                          resource_version="1", timeout_seconds=1))  # fmt: skip
            assert exc.value.status == 410
            events = watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version="3", timeout_seconds=1
            )
            assert [e["object"].metadata.name for e in events] == ["p2", "p3", "p4"]


def test_open_watch_ends_with_410_on_expiry(api, core):
    start = core.list_namespaced_pod("default").metadata.resource_version
    got: list[BaseException] = []

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=5
            ):
                pass
        except ApiException as exc:
            got.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 2
    while api.open_watches == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    api.expire_history()
    thread.join(3)
    assert [e.status for e in got] == [410]


def test_discovery(api_client):
    assert client.VersionApi(api_client).get_code().major == "1"
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, pool()
    )
    groups = client.ApisApi(api_client).get_api_versions().groups
    listed = [(g.name, g.preferred_version.version) for g in groups]
    assert listed == sorted(listed)
    # Every installed CRD's group, objects or not, as kube-apiserver lists them.
    assert {(GROUP, VERSION), ("workload.infergate.io", "v1alpha1")} <= set(listed)


async def test_async_context_manager():
    async with KubeAPIEmulator() as api:
        api.put(pod("p1"))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{api.url}/api/v1/namespaces/default/pods") as resp:
                body = await resp.json()
            assert body["kind"] == "PodList"
            assert [p["metadata"]["name"] for p in body["items"]] == ["p1"]
            assert body["metadata"]["resourceVersion"] == api.resource_version == "2"
            url = f"{api.url}/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=30"
            async with session.get(url) as resp:
                first = json.loads(await resp.content.readline())
                assert first["type"] == "ADDED"
                began = time.monotonic()
                await api.stop()  # ends open watches rather than waiting for their timeout
                assert await resp.content.read() == b""
                assert time.monotonic() - began < 2
