"""The API emulator (tests/kubeapi.py) works for the official kubernetes client."""

from __future__ import annotations

import copy
import json
import re
import threading
import time

import aiohttp
import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client import ApiException

from tests.kube_cel import CELCompileError
from tests.kube_crd import DEFAULT_CRDS, load_crds
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
        "spec": {
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
        },
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


# ---- custom resources: what kube-apiserver does on write ------------------------------------

WIDGETS = ("example.infergate.io", "v1", "default", "widgets")
# A schema with one of each thing kube-apiserver checks on a custom resource.
WIDGET_SCHEMA = """
type: object
properties:
  apiVersion: {type: string}
  kind: {type: string}
  metadata: {type: object}
  spec:
    type: object
    required: [size]
    x-kubernetes-validations:
    - rule: "!has(self.owner) || self.owner != 'root'"
      message: root may not own widgets
      reason: FieldValueForbidden
    - rule: "!has(self.minReplicas) || self.minReplicas <= self.replicas"
      messageExpression: >-
        'minReplicas ' + string(self.minReplicas) + ' exceeds replicas ' + string(self.replicas)
      fieldPath: .minReplicas
    properties:
      size: {type: string, enum: [small, large]}
      replicas: {type: integer, minimum: 0, maximum: 10, default: 1}
      minReplicas: {type: integer}
      ratio: {type: number, maximum: 1, exclusiveMaximum: true}
      label: {type: string, minLength: 1, maxLength: 8, pattern: "^[a-z]*$"}
      since: {type: string, format: date-time}
      tags:
        type: array
        minItems: 1
        maxItems: 3
        x-kubernetes-list-type: set
        items: {type: string}
      ports:
        type: array
        maxItems: 4
        x-kubernetes-list-type: map
        x-kubernetes-list-map-keys: [number]
        items:
          type: object
          required: [number]
          x-kubernetes-validations:
          - rule: "self.protocol != 'SCTP'"
            message: SCTP is not supported
          properties:
            number: {type: integer}
            protocol: {type: string, default: TCP}
      port:
        x-kubernetes-int-or-string: true
        anyOf: [{type: integer}, {type: string}]
      limits:
        type: object
        additionalProperties: {type: string, maxLength: 4}
      owner: {type: string}
      serial:
        type: string
        x-kubernetes-validations:
        - {rule: self == oldSelf, message: serial is immutable}
      extra:
        type: object
        x-kubernetes-preserve-unknown-fields: true
        properties:
          known: {type: integer}
      timeout:
        type: string
        format: duration
        x-kubernetes-validations:
        - {rule: "self <= duration('1h')", message: at most 1h}
      address:
        type: string
        x-kubernetes-validations:
        - {rule: isIP(self) && ip(self).family() == 4, message: must be an IPv4 address}
  status:
    type: object
    properties:
      replicas: {type: integer, minimum: 0}
      phase: {type: string, enum: [Pending, Ready]}
"""
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.infergate.io"},
    "spec": {
        "group": "example.infergate.io",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                    },
                },
                "schema": {"openAPIV3Schema": yaml.safe_load(WIDGET_SCHEMA)},
            }
        ],
    },
}


def widget(name: str = "w", **spec) -> dict:
    return {
        "apiVersion": "example.infergate.io/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": "small", **spec},
    }


@pytest.fixture
def widgets():
    with KubeAPIEmulator(crds=[WIDGET_CRD]).threaded() as api:
        with client.ApiClient(api.client_configuration()) as c:
            yield api, client.CustomObjectsApi(c)


def refused(call, *args, **kwargs) -> tuple[int, dict]:
    with pytest.raises(ApiException) as exc:
        call(*args, **kwargs)
    return exc.value.status, status_of(exc.value)


def causes(status: dict) -> list[tuple[str, str]]:
    return [(c["field"], c["reason"]) for c in status["details"]["causes"]]


def test_kinds_without_a_crd_are_not_found(api, custom, widgets):
    # A group nobody installed, an unserved version, the wrong scope: 404 as kube-apiserver.
    code, status = refused(
        custom.create_namespaced_custom_object,
        "things.example.com", "v1", "default", "things", {"metadata": {"name": "r"}},
    )  # fmt: skip
    assert (code, status["reason"]) == (404, "NotFound")
    code, _ = refused(custom.list_namespaced_custom_object, GROUP, "v1alpha2", "default", PLURAL)
    assert code == 404
    code, _ = refused(custom.create_cluster_custom_object, GROUP, VERSION, PLURAL, pool())
    assert code == 404
    # Only the CRDs given are installed; built-in groups need none.
    emulator, widget_api = widgets
    code, _ = refused(widget_api.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL)
    assert code == 404
    with pytest.raises(ValueError, match="no CRD installed"):
        emulator.put(pool())
    emulator.put(pod("p1"))


def test_a_crd_created_through_the_api_is_served_from_then_on():
    # As `kubectl apply` installs a CRD: before it, 404; after it, pruned and validated.
    with KubeAPIEmulator(crds=[]).threaded() as api:
        with client.ApiClient(api.client_configuration()) as c:
            widgets = client.CustomObjectsApi(c)
            group, plural = WIDGET_CRD["spec"]["group"], "widgets"
            code, _ = refused(
                widgets.create_namespaced_custom_object, group, "v1", "default", plural, widget()
            )
            assert code == 404
            client.ApiextensionsV1Api(c).create_custom_resource_definition(
                WIDGET_CRD, _preload_content=False
            )
            assert api.resource_of(group, "Widget").plural == plural
            created = widgets.create_namespaced_custom_object(
                group, "v1", "default", plural, {**widget(), "extra": 1}
            )
            assert "extra" not in created
            code, _ = refused(
                widgets.create_namespaced_custom_object, group, "v1", "default", plural,
                widget("w2", size="enormous"),
            )  # fmt: skip
            assert code == 422


def test_a_custom_resource_is_stored_once_for_all_its_served_versions(custom):
    # Gateway API's HTTPRoute serves v1 and v1beta1 (conversion None): one object, two views.
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r"},
        "spec": {"parentRefs": [{"name": "gw"}]},
    }
    args = ("gateway.networking.k8s.io", "v1beta1", "default", "httproutes")
    custom.create_namespaced_custom_object(*args, route)
    got = custom.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", "default",
                                              "httproutes", "r")  # fmt: skip
    assert got["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert got["spec"] == route["spec"]
    listed = custom.list_namespaced_custom_object(*args)
    assert [r["apiVersion"] for r in listed["items"]] == ["gateway.networking.k8s.io/v1beta1"]
    code, _ = refused(custom.list_namespaced_custom_object, "gateway.networking.k8s.io",
                      "v1alpha1", "default", "httproutes")  # fmt: skip
    assert code == 404


def test_unknown_fields_are_pruned_as_field_validation_says(widgets):
    api, custom = widgets
    body = widget("warned", bogus=1, extra={"known": 1, "anything": {"kept": True}})
    body["metadata"]["nonsense"] = "x"
    body["unknownTopLevel"] = {}
    created, code, headers = _with_headers(custom, body)
    assert code == 201
    # Warn (the server's default): dropped, one Warning header per field.
    assert "bogus" not in created["spec"] and "nonsense" not in created["metadata"]
    assert "unknownTopLevel" not in created
    # x-kubernetes-preserve-unknown-fields keeps what the schema does not name.
    assert created["spec"]["extra"] == {"known": 1, "anything": {"kept": True}}
    expected = ['unknown field "metadata.nonsense"', 'unknown field "spec.bogus"',
                'unknown field "unknownTopLevel"']  # fmt: skip
    assert sorted(headers) == [f"299 - {json.dumps(w)}" for w in expected]
    assert sorted(api.warnings) == expected

    # Ignore: dropped silently.
    api.warnings.clear()
    quiet = custom.create_namespaced_custom_object(
        *WIDGETS, widget("quiet", bogus=1), field_validation="Ignore"
    )
    assert "bogus" not in quiet["spec"] and api.warnings == []

    # Strict: refused with 400 BadRequest naming every unknown field (kubectl's default).
    code, status = refused(
        custom.create_namespaced_custom_object, *WIDGETS,
        widget("strict", bogus=1, ports=[{"number": 1, "nope": 2}]), field_validation="Strict",
    )  # fmt: skip
    assert (code, status["reason"]) == (400, "BadRequest")
    assert status["message"] == (
        'Widget in version "v1" cannot be handled as a Widget: strict decoding error: '
        'unknown field "spec.bogus", unknown field "spec.ports[0].nope"'
    )
    # Patches too.
    code, _ = refused(
        custom.patch_namespaced_custom_object, *WIDGETS, "quiet",
        {"spec": {"bogus": 2}}, field_validation="Strict",
    )  # fmt: skip
    assert code == 400
    assert (
        "bogus"
        not in custom.patch_namespaced_custom_object(*WIDGETS, "quiet", {"spec": {"bogus": 2}})[
            "spec"
        ]
    )
    code, status = refused(
        custom.create_namespaced_custom_object, *WIDGETS, widget("x"), field_validation="Loose"
    )
    assert (code, status["reason"]) == (400, "BadRequest")


def _with_headers(custom, body) -> tuple[dict, int, list[str]]:
    resp = custom.create_namespaced_custom_object(*WIDGETS, body, _preload_content=False)
    return json.loads(resp.data), resp.status, resp.headers.getlist("Warning")


def test_defaults_on_write_and_on_read(api, custom, widgets):
    emulator, widget_api = widgets
    created = widget_api.create_namespaced_custom_object(
        *WIDGETS, widget(ports=[{"number": 80}], replicas=None)
    )
    # A missing field, a null non-nullable one, and a field inside a list item get defaults.
    assert created["spec"]["replicas"] == 1
    assert created["spec"]["ports"] == [{"number": 80, "protocol": "TCP"}]
    # An object stored without them (as before a CRD gained a default) is read with them.
    emulator.put(widget("old"))
    assert emulator.get("example.infergate.io/v1", "Widget", "old")["spec"]["replicas"] == 1
    listed = widget_api.list_namespaced_custom_object(*WIDGETS)["items"]
    assert [w["spec"]["replicas"] for w in listed] == [1, 1]
    assert widget_api.get_namespaced_custom_object_scale(*WIDGETS, "old")["spec"]["replicas"] == 1
    # Reading defaults is no spec change: a status write leaves the generation alone.
    after = widget_api.patch_namespaced_custom_object_status(
        *WIDGETS, "old", {"status": {"phase": "Ready"}}
    )
    assert after["metadata"]["generation"] == 1
    # Our InferencePool CRD: the picker reference's defaults.
    ref = {"name": "llama-epp", "port": {"number": 9002}}
    got = custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        {**pool(), "spec": {**pool()["spec"], "endpointPickerRef": ref}},
    )
    assert got["spec"]["endpointPickerRef"]["kind"] == "Service"
    assert got["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # (what is wrong, [(field, reason)]) as kube-apiserver reports them
        ({"size": None}, [("spec.size", "FieldValueRequired")]),  # null is pruned
        ({"size": "huge"}, [("spec.size", "FieldValueNotSupported")]),
        ({"replicas": "two"}, [("spec.replicas", "FieldValueTypeInvalid")]),
        ({"replicas": 11}, [("spec.replicas", "FieldValueInvalid")]),
        ({"replicas": -1}, [("spec.replicas", "FieldValueInvalid")]),
        ({"ratio": 1}, [("spec.ratio", "FieldValueInvalid")]),
        ({"label": ""}, [("spec.label", "FieldValueInvalid")]),
        ({"label": "toolongname"}, [("spec.label", "FieldValueTooLong")]),
        ({"label": "UPPER"}, [("spec.label", "FieldValueInvalid")]),
        ({"since": "yesterday"}, [("spec.since", "FieldValueInvalid")]),
        ({"tags": []}, [("spec.tags", "FieldValueInvalid")]),
        ({"tags": ["a", "b", "c", "d"]}, [("spec.tags", "FieldValueTooMany")]),
        ({"tags": ["a", "a"]}, [("spec.tags[1]", "FieldValueDuplicate")]),
        ({"ports": [{"number": 1}, {"number": 1}]}, [("spec.ports[1]", "FieldValueDuplicate")]),
        ({"ports": [{"protocol": "UDP"}]}, [("spec.ports[0].number", "FieldValueRequired")]),
        ({"port": True}, [("spec.port", "FieldValueTypeInvalid")]),
        ({"limits": {"cpu": "toolong"}}, [("spec.limits[cpu]", "FieldValueTooLong")]),
        ({"replicas": "x", "label": "UPPER"},
         [("spec.replicas", "FieldValueTypeInvalid"), ("spec.label", "FieldValueInvalid")]),
    ],
)  # fmt: skip
def test_openapi_validation_is_422_with_causes(widgets, spec, expected):
    _, custom = widgets
    code, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(**spec))
    assert (code, status["reason"], status["kind"]) == (422, "Invalid", "Status")
    details = status["details"]
    assert (details["kind"], details["group"], details["name"]) == (
        "Widget", "example.infergate.io", "w",
    )  # fmt: skip
    assert sorted(causes(status)) == sorted(expected)
    assert status["message"].startswith('Widget.example.infergate.io "w" is invalid: ')


def test_validation_messages_read_like_kube_apiserver(widgets):
    _, custom = widgets
    body = widget(size="huge")
    del body["spec"]["size"]
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, body)
    assert (
        status["message"] == 'Widget.example.infergate.io "w" is invalid: spec.size: Required value'
    )
    assert status["details"]["causes"] == [
        {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.size"}
    ]
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(size="huge"))
    assert status["details"]["causes"][0]["message"] == (
        'Unsupported value: "huge": supported values: "small", "large"'
    )
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(replicas=11))
    assert status["details"]["causes"][0]["message"] == (
        "Invalid value: 11: spec.replicas in body should be less than or equal to 10"
    )
    # Valid values of every kind pass (int-or-string as either).
    ok = widget(
        replicas=3, minReplicas=2, ratio=0.5, label="abc", since="2025-01-01T00:00:00Z",
        tags=["a"], port="http", limits={"cpu": "2"}, timeout="30m", address="10.0.0.1",
    )  # fmt: skip
    custom.create_namespaced_custom_object(*WIDGETS, ok)
    custom.create_namespaced_custom_object(*WIDGETS, {**widget("w2", port=8080)})
    # Object names are RFC 1123 subdomains.
    code, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget("Bad_Name"))
    assert (code, causes(status)) == (422, [("metadata.name", "FieldValueInvalid")])


def test_cel_rules(widgets):
    _, custom = widgets
    # message, on the node's path, value rendered as its type as the server does
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(owner="root"))
    assert status["details"]["causes"] == [
        {"reason": "FieldValueForbidden", "message": "Forbidden: root may not own widgets",
         "field": "spec"}
    ]  # fmt: skip
    # messageExpression and fieldPath
    _, status = refused(
        custom.create_namespaced_custom_object, *WIDGETS, widget(replicas=1, minReplicas=3)
    )
    assert status["details"]["causes"] == [
        {"reason": "FieldValueInvalid", "field": "spec.minReplicas",
         "message": 'Invalid value: "object": minReplicas 3 exceeds replicas 1'}
    ]  # fmt: skip
    # Kubernetes library functions and schema-typed values (a duration string is a duration).
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(address="::1"))
    assert causes(status) == [("spec.address", "FieldValueInvalid")]
    assert "must be an IPv4 address" in status["message"]
    _, status = refused(custom.create_namespaced_custom_object, *WIDGETS, widget(timeout="2h"))
    assert causes(status) == [("spec.timeout", "FieldValueInvalid")]
    # Rules on map values and list items name the entry.
    _, status = refused(
        custom.create_namespaced_custom_object,
        *WIDGETS,
        widget(ports=[{"number": 1, "protocol": "SCTP"}]),
    )
    assert causes(status) == [("spec.ports[0]", "FieldValueInvalid")]


def test_transition_rules_and_ratcheting(api, widgets):
    emulator, custom = widgets
    custom.create_namespaced_custom_object(*WIDGETS, widget(serial="a1"))
    # oldSelf: immutable once set, whatever way the update comes
    code, status = refused(
        custom.patch_namespaced_custom_object, *WIDGETS, "w", {"spec": {"serial": "b2"}}
    )
    assert code == 422 and status["details"]["causes"][0]["message"] == (
        'Invalid value: "string": serial is immutable'
    )
    current = custom.get_namespaced_custom_object(*WIDGETS, "w")
    current["spec"]["serial"] = "b2"
    code, _ = refused(custom.replace_namespaced_custom_object, *WIDGETS, "w", current)
    assert code == 422
    custom.patch_namespaced_custom_object(*WIDGETS, "w", {"spec": {"label": "ok"}})
    # An object stored invalid (as before a CRD tightened) can still be updated elsewhere:
    # unchanged values are not validated again; a change must be valid.
    emulator.put(widget("legacy", size="huge", replicas=1))
    custom.patch_namespaced_custom_object(*WIDGETS, "legacy", {"spec": {"replicas": 2}})
    code, status = refused(
        custom.patch_namespaced_custom_object, *WIDGETS, "legacy", {"spec": {"size": "tiny"}}
    )
    assert causes(status) == [("spec.size", "FieldValueNotSupported")]


def test_status_and_scale_are_validated_too(custom, widgets):
    _, widget_api = widgets
    args = (*WIDGETS, "w")
    widget_api.create_namespaced_custom_object(*WIDGETS, widget())
    code, status = refused(
        widget_api.patch_namespaced_custom_object_status, *args, {"status": {"phase": "Gone"}}
    )
    assert (code, causes(status)) == (422, [("status.phase", "FieldValueNotSupported")])
    code, status = refused(
        widget_api.patch_namespaced_custom_object_status, *args, {"status": {"bogus": 1}},
        field_validation="Strict",
    )  # fmt: skip
    assert code == 400 and 'unknown field "status.bogus"' in status["message"]
    assert widget_api.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Ready"}})
    # The scale subresource writes spec.replicas through the same schema (maximum 10).
    code, status = refused(
        widget_api.patch_namespaced_custom_object_scale, *args, {"spec": {"replicas": 11}}
    )
    assert (code, causes(status)) == (422, [("spec.replicas", "FieldValueInvalid")])
    code, status = refused(
        widget_api.patch_namespaced_custom_object_scale, *args, {"spec": {"replicas": -1}}
    )
    assert (code, causes(status)) == (422, [("spec.replicas", "FieldValueInvalid")])
    assert widget_api.patch_namespaced_custom_object_scale(*args, {"spec": {"replicas": 4}})[
        "spec"
    ] == {"replicas": 4}
    # Subresources exist only where the CRD declares them: a Model has no /scale.
    code, _ = refused(custom.get_namespaced_custom_object_scale,
                      "workload.infergate.io", "v1alpha1", "default", "models", "m")  # fmt: skip
    assert code == 404


def test_status_is_kept_apart_only_with_a_status_subresource(custom):
    # Volcano's PodGroup has none: the object carries its status and /status is 404.
    args = ("scheduling.volcano.sh", "v1beta1", "default", "podgroups")
    group = {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {"name": "g"},
        "spec": {"minMember": 2},
        "status": {"phase": "Pending"},
    }
    created = custom.create_namespaced_custom_object(*args, group)
    assert created["status"] == {"phase": "Pending"} and created["spec"]["queue"] == "default"
    code, _ = refused(custom.patch_namespaced_custom_object_status, *args, "g", {"status": {}})
    assert code == 404
    # With one (InferencePool), create drops the status as kube-apiserver does.
    body = {**pool(), "status": {"parents": []}}
    assert "status" not in custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, body
    )


def test_every_shipped_cel_rule_compiles():
    # The emulator compiles each rule when it installs a CRD; one it cannot compile raises.
    installed = load_crds(DEFAULT_CRDS)
    rules = [rule for crd in installed for schema in crd.schemas.values()
             for rule in schema.rules()]  # fmt: skip
    assert {c.kind for c in installed} >= {"Model", "ModelInfer", "InferencePool", "PodGroup"}
    assert len(rules) >= 20


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("self.size ==", "compilation failed"),
        ("self.nosuchfield == 1", "undefined field 'nosuchfield'"),
        ("self.size.isFrobnicated()", "undeclared reference to 'isFrobnicated'"),
        ("other.size == 'small'", "undeclared reference to 'other'"),
        ("self.ports.all(p, p.nosuch > 0)", "undefined field 'nosuch'"),
    ],
)
def test_a_rule_that_does_not_compile_fails_loudly(rule, why):
    crd = copy.deepcopy(WIDGET_CRD)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["x-kubernetes-validations"] = [{"rule": rule, "message": "m"}]
    with pytest.raises(CELCompileError, match=re.escape(why)) as exc:
        KubeAPIEmulator(crds=[crd])
    assert "properties[spec].x-kubernetes-validations[0].rule" in str(exc.value)


def service(name: str, selector: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector or {"app": "x"}, "ports": [{"port": 80}]}}  # fmt: skip


def test_service_names_are_dns_1035_labels_and_label_values_at_most_63(core, api_client):
    # What kube-apiserver refuses and our derived names depend on (api/object_names.py).
    for bad in ("a" * 64, "7b-model", "llama.v3"):
        code, status = refused(core.create_namespaced_service, "default", service(bad))
        assert (code, causes(status)) == (422, [("metadata.name", "FieldValueInvalid")]), bad
    core.create_namespaced_service("default", service("a" * 63))
    # Other kinds keep the subdomain rule: dots and a leading digit are fine.
    core.create_namespaced_pod("default", pod("7b.model"))
    too_long = {"infergate.io/model": "m" * 64}
    code, status = refused(core.create_namespaced_pod, "default", pod("p2", labels=too_long))
    assert (code, causes(status)) == (422, [("metadata.labels", "FieldValueInvalid")])
    code, _ = refused(core.create_namespaced_service, "default", service("s", too_long))
    assert code == 422
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "d"}},
                 "template": {"metadata": {"labels": {"app": "d", "bad": "-x"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }  # fmt: skip
    apps = client.AppsV1Api(api_client)
    code, status = refused(apps.create_namespaced_deployment, "default", deployment)
    assert (code, causes(status)) == (422, [("spec.template.metadata.labels", "FieldValueInvalid")])
    # on update too
    core.create_namespaced_pod("default", pod("p3"))
    code, _ = refused(
        core.patch_namespaced_pod, "p3", "default", {"metadata": {"labels": {"k": "v" * 64}}}
    )
    assert code == 422
