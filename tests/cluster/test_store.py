"""One contract for both stores (cluster/store.py): MemoryStore, and KubeStore talking over
real HTTP to the API emulator (tests/kubeapi.py); then the Informer on both, and the WorkQueue."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import pytest
from kubernetes import client

from infergw.cluster.informer import Informer
from infergw.cluster.kube_store import KubeStore, Unavailable, error_from
from infergw.cluster.store import (
    MODEL,
    MODEL_INFER,
    POD,
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    Kind,
    NotFound,
    Obj,
    Store,
    owner_reference,
)
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.workqueue import WorkQueue
from tests.kubeapi import KubeAPIEmulator

FINALIZER = "infergate.io/cleanup"


@dataclass
class Backend:
    name: str
    store: Store
    expire: Callable[[], None]  # forget the watch history (etcd compaction)
    # Delete an object and expire the history before any watcher can see the deletion.
    remove_unseen: Callable[[Kind, str, str], Awaitable[None]]
    api: KubeAPIEmulator | None = None


@pytest.fixture(params=["memory", "kube"])
async def backend(request):
    if request.param == "memory":
        store = MemoryStore()

        async def remove_unseen(kind: Kind, namespace: str, name: str) -> None:
            await store.delete(kind, namespace, name)  # never suspends: no watcher runs
            store.expire_history()

        yield Backend("memory", store, store.expire_history, remove_unseen)
        return
    async with KubeAPIEmulator() as api:
        store = KubeStore(client.ApiClient(api.client_configuration()), watch_timeout=30)

        async def remove_unseen(kind: Kind, namespace: str, name: str) -> None:
            # The emulator serves watches on this loop: they cannot run between the two.
            api.delete(kind.api_version, kind.kind, name, namespace)
            api.expire_history()

        try:
            yield Backend("kube", store, api.expire_history, remove_unseen, api)
        finally:
            store.close()


# ---- objects ------------------------------------------------------------------------------


def pod(name: str, ns: str = "default", labels: dict | None = None, **meta) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}, **meta},
        "spec": {"containers": [{"name": "engine", "image": "sim"}]},
    }


# What a ModelInfer's role needs at least (its CRD requires an entry pod template).
POD_TEMPLATE = {"spec": {"containers": [{"name": "engine", "image": "sim"}]}}


def model_infer(name: str, replicas: int = 1, ns: str = "default", **meta) -> Obj:
    return {
        "apiVersion": MODEL_INFER.api_version,
        "kind": "ModelInfer",
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": {
            "replicas": replicas,
            "template": {"roles": [{"name": "decode", "entryTemplate": POD_TEMPLATE}]},
        },
    }


def model(name: str, ns: str = "default") -> Obj:
    return {
        "apiVersion": MODEL.api_version,
        "kind": "Model",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "modelURI": "hf://tiny",
            "image": "sim",
            "engine": {"type": "Simulator"},
            "replicas": 1,
            "backend": {"aggregated": {}},
        },
    }


def names(objs: list[Obj]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)


async def eventually(condition: Callable[[], Awaitable[bool] | bool], within: float = 5.0):
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


async def watch_events(
    store: Store, kind: Kind, namespace: str | None, rv: str, count: int, within: float = 5.0
) -> list[tuple[str, Obj]]:
    """The first `count` events (bookmarks left out) of a watch from rv."""
    seen: list[tuple[str, Obj]] = []

    async def run() -> None:
        async with aclosing(store.watch(kind, namespace, rv)) as events:
            async for event, obj in events:
                if event != "BOOKMARK":
                    seen.append((event, obj))
                    if len(seen) == count:
                        return

    await asyncio.wait_for(run(), within)
    return seen


# ---- CRUD ---------------------------------------------------------------------------------


async def test_create_get_list_by_namespace_and_labels(backend):
    s = backend.store
    created = await s.create(pod("a", labels={"app": "sim", "tier": "gpu"}))
    m = created["metadata"]
    assert m["uid"] and m["creationTimestamp"] and m["generation"] == 1
    assert int(m["resourceVersion"]) > 0 and m["namespace"] == "default"
    await s.create(pod("b", labels={"app": "sim", "tier": "cpu"}))
    await s.create(pod("c", labels={"app": "other"}))
    await s.create(pod("d", ns="team", labels={"app": "sim"}))

    got = await s.get(POD, "default", "a")
    assert got["metadata"]["uid"] == m["uid"] and got["kind"] == "Pod"
    assert got["spec"] == pod("a")["spec"]
    assert await s.get(POD, "default", "missing") is None
    assert await s.get(POD, "team", "a") is None

    items, rv = await s.list(POD, "default")
    assert names(items) == ["a", "b", "c"] and int(rv) >= int(m["resourceVersion"])
    assert all(o["kind"] == "Pod" and o["apiVersion"] == "v1" for o in items)
    assert names((await s.list(POD, "default", {"app": "sim"}))[0]) == ["a", "b"]
    assert names((await s.list(POD, "default", {"app": "sim", "tier": "cpu"}))[0]) == ["b"]
    assert names((await s.list(POD, None, {"app": "sim"}))[0]) == ["a", "b", "d"]
    assert names((await s.list(POD, "team"))[0]) == ["d"]
    assert (await s.list(MODEL_INFER, "default"))[0] == []


async def test_create_existing_is_already_exists(backend):
    await backend.store.create(model_infer("mi"))
    with pytest.raises(AlreadyExists):
        await backend.store.create(model_infer("mi", replicas=3))
    assert (await backend.store.get(MODEL_INFER, "default", "mi"))["spec"]["replicas"] == 1
    await backend.store.create(model_infer("mi", ns="team"))  # another namespace is fine


async def test_update_bumps_resource_version_and_generation_on_spec_change(backend):
    s = backend.store
    v1 = await s.create(model_infer("mi"))
    relabelled = copy.deepcopy(v1)
    relabelled["metadata"]["labels"] = {"tier": "gpu"}
    v2 = await s.update(relabelled)
    assert int(v2["metadata"]["resourceVersion"]) > int(v1["metadata"]["resourceVersion"])
    assert v2["metadata"]["generation"] == 1 and v2["metadata"]["labels"] == {"tier": "gpu"}
    assert v2["metadata"]["uid"] == v1["metadata"]["uid"]

    v2["spec"]["replicas"] = 3
    v3 = await s.update(v2)
    assert int(v3["metadata"]["resourceVersion"]) > int(v2["metadata"]["resourceVersion"])
    assert v3["metadata"]["generation"] == 2
    assert v3["metadata"]["creationTimestamp"] == v1["metadata"]["creationTimestamp"]
    got = await s.get(MODEL_INFER, "default", "mi")
    assert got["spec"]["replicas"] == 3 and got["metadata"]["generation"] == 2


async def test_stale_resource_version_is_a_conflict(backend):
    s = backend.store
    v1 = await s.create(model_infer("mi"))
    v2 = await s.update({**copy.deepcopy(v1), "spec": {**v1["spec"], "replicas": 2}})
    stale = copy.deepcopy(v1)
    stale["spec"]["replicas"] = 5
    with pytest.raises(Conflict):
        await s.update(stale)
    with pytest.raises(Conflict):
        await s.update_status({**copy.deepcopy(v1), "status": {"replicas": 1}})
    got = await s.get(MODEL_INFER, "default", "mi")
    assert got["spec"]["replicas"] == 2 and "replicas" not in (got.get("status") or {})
    # read again and retry: it works
    got["spec"]["replicas"] = 5
    assert (await s.update(got))["metadata"]["generation"] == v2["metadata"]["generation"] + 1


async def test_update_keeps_status_and_update_status_keeps_spec(backend):
    s = backend.store
    mi = await s.create(model_infer("mi"))
    mi["status"] = {"replicas": 1, "observedGeneration": 1}
    after_status = await s.update_status(mi)
    assert after_status["status"] == {"replicas": 1, "observedGeneration": 1}
    assert after_status["metadata"]["generation"] == 1

    after_status["spec"]["replicas"] = 4
    after_status["status"] = {"replicas": 99}  # ignored by update
    updated = await s.update(after_status)
    assert updated["spec"]["replicas"] == 4 and updated["metadata"]["generation"] == 2
    assert updated["status"] == {"replicas": 1, "observedGeneration": 1}

    updated["spec"]["replicas"] = 7  # ignored by update_status
    updated["metadata"]["labels"] = {"ignored": "too"}
    updated["status"] = {"replicas": 4, "observedGeneration": 2}
    final = await s.update_status(updated)
    got = await s.get(MODEL_INFER, "default", "mi")
    for o in (final, got):
        assert o["spec"]["replicas"] == 4 and o["metadata"]["generation"] == 2
        assert o["status"] == {"replicas": 4, "observedGeneration": 2}
        assert not o["metadata"].get("labels")


async def test_delete_then_not_found(backend):
    s = backend.store
    mi = await s.create(model_infer("mi"))
    await s.delete(MODEL_INFER, "default", "mi")
    assert await s.get(MODEL_INFER, "default", "mi") is None
    assert (await s.list(MODEL_INFER))[0] == []
    with pytest.raises(NotFound):
        await s.delete(MODEL_INFER, "default", "mi")
    with pytest.raises(NotFound):
        await s.update(mi)
    with pytest.raises(NotFound):
        await s.update_status(mi)
    recreated = await s.create(model_infer("mi"))  # the name is free again, a new object
    assert recreated["metadata"]["uid"] != mi["metadata"]["uid"]


async def test_finalizers_delay_deletion(backend):
    s = backend.store
    await s.create(model_infer("mi", finalizers=[FINALIZER]))
    await s.delete(MODEL_INFER, "default", "mi")
    marked = await s.get(MODEL_INFER, "default", "mi")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["finalizers"] == [FINALIZER]
    await s.delete(MODEL_INFER, "default", "mi")  # again: still only marked
    again = await s.get(MODEL_INFER, "default", "mi")
    assert again["metadata"]["deletionTimestamp"] == marked["metadata"]["deletionTimestamp"]

    # an update keeps the mark and the object while a finalizer is left
    again["metadata"]["labels"] = {"cleaning": "yes"}
    kept = await s.update(again)
    assert kept["metadata"]["deletionTimestamp"] == marked["metadata"]["deletionTimestamp"]
    assert await s.get(MODEL_INFER, "default", "mi") is not None

    # removing the last finalizer lets the deletion finish
    kept["metadata"]["finalizers"] = []
    await s.update(kept)
    assert await s.get(MODEL_INFER, "default", "mi") is None


async def test_update_cannot_set_deletion_timestamp(backend):
    s = backend.store
    mi = await s.create(model_infer("mi"))
    mi["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    mi["metadata"]["labels"] = {"x": "1"}
    await s.update(mi)
    got = await s.get(MODEL_INFER, "default", "mi")
    assert got is not None and got["metadata"]["labels"] == {"x": "1"}
    assert "deletionTimestamp" not in got["metadata"]


async def test_owner_references_cascade(backend):
    s = backend.store
    owner = await s.create(model("m"))
    keeper = await s.create(model("keeper"))
    child = await s.create(model_infer("mi", ownerReferences=[owner_reference(owner)]))
    ref = owner_reference(child)
    await s.create(pod("grandchild", ownerReferences=[ref]))
    await s.create(pod("held", ownerReferences=[ref], finalizers=[FINALIZER]))
    await s.create(pod("shared", ownerReferences=[ref, owner_reference(keeper, controller=False)]))
    await s.create(pod("unrelated"))

    await s.delete(MODEL, "default", "m")

    async def settled() -> bool:
        return (
            await s.get(MODEL_INFER, "default", "mi") is None
            and await s.get(POD, "default", "grandchild") is None
            and bool(((await s.get(POD, "default", "held")) or {}).get("metadata", {}).get(
                "deletionTimestamp"
            ))
        )  # fmt: skip

    await eventually(settled)
    assert await s.get(MODEL, "default", "m") is None
    assert names((await s.list(MODEL))[0]) == ["keeper"]
    # another owner is still there; nobody owns the last one
    assert names((await s.list(POD))[0]) == ["held", "shared", "unrelated"]

    held = await s.get(POD, "default", "held")
    held["metadata"]["finalizers"] = []
    await s.update(held)
    assert names((await s.list(POD))[0]) == ["shared", "unrelated"]


# ---- watch --------------------------------------------------------------------------------


async def test_watch_from_a_resource_version_in_order(backend):
    s = backend.store
    await s.create(model_infer("before"))
    _, rv = await s.list(MODEL_INFER, "default")
    mi = await s.create(model_infer("mi"))
    await s.create(model_infer("elsewhere", ns="team"))  # another namespace: not watched
    mi["spec"]["replicas"] = 2
    await s.update(mi)
    await s.delete(MODEL_INFER, "default", "mi")

    events = await watch_events(s, MODEL_INFER, "default", rv, 3)
    assert [(e, o["metadata"]["name"]) for e, o in events] == [
        ("ADDED", "mi"),
        ("MODIFIED", "mi"),
        ("DELETED", "mi"),
    ]
    assert events[1][1]["spec"]["replicas"] == 2 and events[1][1]["kind"] == "ModelInfer"
    versions = [int(o["metadata"]["resourceVersion"]) for _, o in events]
    assert versions == sorted(versions) and len(set(versions)) == 3

    everywhere = await watch_events(s, MODEL_INFER, None, rv, 4)
    assert [o["metadata"]["name"] for _, o in everywhere] == ["mi", "elsewhere", "mi", "mi"]


async def test_watch_sees_changes_made_while_watching(backend):
    s = backend.store
    _, rv = await s.list(POD, "default")
    task = asyncio.create_task(watch_events(s, POD, "default", rv, 2))
    await s.create(pod("p"))
    await s.delete(POD, "default", "p")
    assert [(e, o["metadata"]["name"]) for e, o in await task] == [
        ("ADDED", "p"),
        ("DELETED", "p"),
    ]


async def test_expired_watch_raises_gone(backend):
    s = backend.store
    _, rv = await s.list(MODEL_INFER, "default")
    await s.create(model_infer("mi"))
    backend.expire()
    with pytest.raises(Gone):
        await watch_events(s, MODEL_INFER, "default", rv, 1)
    # listing again gives a version to watch from
    items, rv = await s.list(MODEL_INFER, "default")
    assert names(items) == ["mi"]
    task = asyncio.create_task(watch_events(s, MODEL_INFER, "default", rv, 1))
    await s.delete(MODEL_INFER, "default", "mi")
    assert [e for e, _ in await task] == ["DELETED"]


# ---- scale subresource --------------------------------------------------------------------


async def test_scale_subresource(backend):
    s = backend.store
    if not hasattr(s, "scale"):
        pytest.skip(f"{type(s).__name__} has no scale/set_scale yet")
    mi = await s.create(model_infer("mi", replicas=2))
    mi["status"] = {"replicas": 1, "labelSelector": "infergate.io/modelinfer=mi"}
    await s.update_status(mi)

    scale = await s.scale(MODEL_INFER, "default", "mi")
    assert scale["spec"] == {"replicas": 2}
    assert scale["status"] == {"replicas": 1, "selector": "infergate.io/modelinfer=mi"}

    scaled = await s.set_scale(MODEL_INFER, "default", "mi", 5)
    assert scaled["spec"] == {"replicas": 5} and scaled["status"]["replicas"] == 1
    got = await s.get(MODEL_INFER, "default", "mi")
    assert got["spec"]["replicas"] == 5 and got["metadata"]["generation"] == 2
    assert got["spec"]["template"] == mi["spec"]["template"]  # the rest of the spec stays
    assert got["status"]["labelSelector"] == "infergate.io/modelinfer=mi"

    with pytest.raises(Invalid):
        await s.set_scale(MODEL_INFER, "default", "mi", -1)
    with pytest.raises(NotFound):
        await s.scale(MODEL_INFER, "default", "missing")
    with pytest.raises(NotFound):
        await s.set_scale(MODEL_INFER, "default", "missing", 1)


# ---- informer -----------------------------------------------------------------------------


async def test_informer_syncs_follows_and_relists_after_expiry(backend):
    s = backend.store
    await s.create(model_infer("a"))
    await s.create(model_infer("b"))
    await s.create(model_infer("other-ns", ns="team"))
    informer = Informer(s, MODEL_INFER, "default")
    seen: list[tuple[str, str]] = []
    informer.add_handler(lambda event, obj: seen.append((event, obj["metadata"]["name"])))
    informer.start()
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        assert sorted(informer.cache) == [("default", "a"), ("default", "b")]
        assert sorted(seen) == [("ADDED", "a"), ("ADDED", "b")]

        await s.create(model_infer("c"))
        a = await s.get(MODEL_INFER, "default", "a")
        a["spec"]["replicas"] = 3
        await s.update(a)
        await eventually(
            lambda: (
                informer.get("default", "c") is not None
                and informer.get("default", "a")["spec"]["replicas"] == 3
            )
        )
        assert ("MODIFIED", "a") in seen and ("ADDED", "c") in seen

        # b goes while the history expires: the watch can only answer Gone, and the
        # relist finds b missing and reports it deleted
        await backend.remove_unseen(MODEL_INFER, "default", "b")
        await eventually(lambda: informer.relists >= 1 and informer.get("default", "b") is None)
        assert ("DELETED", "b") in seen
        assert sorted(informer.cache) == [("default", "a"), ("default", "c")]

        # and it watches on from the new list
        await s.create(model_infer("d"))
        await s.delete(MODEL_INFER, "default", "c")
        await eventually(lambda: sorted(informer.cache) == [("default", "a"), ("default", "d")])
        assert seen[-2:] == [("ADDED", "d"), ("DELETED", "c")]
        assert informer.relists == 1
    finally:
        await informer.stop()


async def test_informer_relist_reports_modified_and_added_while_expired(backend):
    s = backend.store
    await s.create(model_infer("a"))
    informer = Informer(s, MODEL_INFER)
    seen: list[tuple[str, str, int]] = []
    informer.add_handler(
        lambda event, obj: seen.append((event, obj["metadata"]["name"], obj["spec"]["replicas"]))
    )
    informer.start()
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        a = await s.get(MODEL_INFER, "default", "a")
        a["spec"]["replicas"] = 2
        await s.update(a)
        await eventually(lambda: informer.get("default", "a")["spec"]["replicas"] == 2)
        await s.create(model_infer("b", ns="team"))
        await eventually(lambda: informer.get("team", "b") is not None)
        # an object added and one deleted just before the history expires: whatever the
        # watch did not deliver, the relist does
        await s.create(model_infer("c"))
        await backend.remove_unseen(MODEL_INFER, "team", "b")
        await eventually(lambda: informer.relists == 1 and informer.get("team", "b") is None)
        await eventually(lambda: informer.get("default", "c") is not None)
        assert seen[:3] == [("ADDED", "a", 1), ("MODIFIED", "a", 2), ("ADDED", "b", 1)]
        assert sorted(seen[3:]) == [("ADDED", "c", 1), ("DELETED", "b", 1)]
        assert sorted(informer.cache) == [("default", "a"), ("default", "c")]
    finally:
        await informer.stop()


# ---- KubeStore specifics ------------------------------------------------------------------


class CountingKubeStore(KubeStore):
    watches = 0

    def watch(self, kind: Kind, namespace: str | None, resource_version: str, labels=None):
        self.watches += 1
        return super().watch(kind, namespace, resource_version, labels)


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("watch ")]


async def test_kube_watch_ends_with_a_bookmark_and_informer_resumes():
    async with KubeAPIEmulator() as api:
        store = CountingKubeStore(client.ApiClient(api.client_configuration()), watch_timeout=1)
        try:
            _, rv = await store.list(POD, "default")
            events = []
            async with aclosing(store.watch(POD, "default", rv)) as stream:
                async for event, obj in stream:
                    events.append((event, obj))
            assert [e for e, _ in events] == ["BOOKMARK"]  # then the stream ended
            assert events[0][1]["metadata"]["resourceVersion"] == rv

            informer = Informer(store, POD, "default")
            informer.start()
            try:
                await asyncio.wait_for(informer.synced.wait(), 5)
                await eventually(lambda: store.watches >= 3)  # the first one timed out
                await store.create(pod("p"))
                await eventually(lambda: informer.get("default", "p") is not None)
                assert informer.relists == 0
            finally:
                await informer.stop()
        finally:
            store.close()


async def test_kube_stopping_a_watch_ends_its_thread():
    async with KubeAPIEmulator() as api:
        store = KubeStore(client.ApiClient(api.client_configuration()), watch_timeout=30)
        try:
            _, rv = await store.list(POD)
            task = asyncio.create_task(watch_events(store, POD, None, rv, 1, within=30))
            await eventually(lambda: api.open_watches == 1 and len(watch_threads()) == 1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await eventually(lambda: not watch_threads())
        finally:
            store.close()


async def test_kube_unreachable_server_is_unavailable():
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: nothing listens
    cfg.retries = False
    store = KubeStore(client.ApiClient(cfg), request_timeout=2)
    try:
        with pytest.raises(Unavailable):
            await store.get(POD, "default", "p")
        with pytest.raises(Unavailable):
            await watch_events(store, POD, "default", "1", 1)
    finally:
        store.close()


async def test_emulator_scale_put_checks_resource_version():
    async with KubeAPIEmulator() as api:
        api.put(model_infer("mi", replicas=2))
        with client.ApiClient(api.client_configuration()) as c:
            custom = client.CustomObjectsApi(c)
            args = ("workload.infergate.io", "v1alpha1", "default", "modelinfers", "mi")
            scale = await asyncio.to_thread(custom.get_namespaced_custom_object_scale, *args)
            assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
            assert scale["spec"] == {"replicas": 2} and scale["status"] == {"replicas": 0}
            scale["spec"]["replicas"] = 3
            done = await asyncio.to_thread(
                custom.replace_namespaced_custom_object_scale, *args, scale
            )
            assert done["spec"] == {"replicas": 3}
            assert int(done["metadata"]["resourceVersion"]) > int(
                scale["metadata"]["resourceVersion"]
            )
            with pytest.raises(client.ApiException) as exc:  # scale is stale by now
                await asyncio.to_thread(custom.replace_namespaced_custom_object_scale, *args, scale)
            assert exc.value.status == 409
            assert api.get(MODEL_INFER.api_version, "ModelInfer", "mi")["spec"]["replicas"] == 3


def test_error_mapping():
    assert isinstance(error_from(404, b'{"reason": "NotFound"}'), NotFound)
    assert isinstance(error_from(409, {"reason": "AlreadyExists", "message": "x"}), AlreadyExists)
    assert isinstance(error_from(409, {"reason": "Conflict", "message": "x"}), Conflict)
    assert isinstance(error_from(410, {"reason": "Expired", "code": 410}), Gone)
    assert isinstance(error_from(422, b'{"reason": "Invalid", "message": "bad"}'), Invalid)
    assert str(error_from(422, b'{"reason": "Invalid", "message": "bad"}')) == "bad"
    assert isinstance(error_from(503, b"upstream down"), Unavailable)
    err = error_from(403, b'{"reason": "Forbidden", "message": "no"}')
    assert err.code == 403 and str(err) == "no" and not isinstance(err, Unavailable)


# ---- work queue ---------------------------------------------------------------------------


async def get_now(q: WorkQueue):
    return await asyncio.wait_for(q.get(), 1)


async def test_workqueue_dedups_keys():
    q = WorkQueue()
    for key in ("a", "b", "a", "a", "c", "b"):
        q.add(key)
    assert len(q) == 3
    assert [await get_now(q) for _ in range(3)] == ["a", "b", "c"]
    assert len(q) == 0
    q.add("a")  # "a" is being worked on: not queued now
    assert len(q) == 0


async def test_workqueue_readds_a_key_added_while_processing_once_done():
    q = WorkQueue()
    q.add("k")
    key = await get_now(q)
    q.add("k")
    q.add("k")
    assert len(q) == 0  # never worked on twice at once
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    q.done(key)
    assert await asyncio.wait_for(waiter, 1) == "k"  # once more, and only once
    q.done("k")
    assert len(q) == 0

    q.add("x")  # a key not re-added goes away when done
    q.done(await get_now(q))
    assert len(q) == 0


async def test_workqueue_rate_limited_backoff_grows_and_forget_resets():
    q = WorkQueue(base_delay=0.01, max_delay=0.05)
    assert [q.add_rate_limited("k") for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert q.failures("k") == 5
    assert q.add_rate_limited("other") == 0.01  # per key
    q.forget("k")
    assert q.failures("k") == 0
    began = time.monotonic()
    assert await get_now(q) == "other"
    assert q.add_rate_limited("k") == 0.01
    assert await get_now(q) == "k"  # it comes back after its delay
    assert time.monotonic() - began >= 0.009


async def test_workqueue_failed_key_comes_back_after_backoff():
    q = WorkQueue(base_delay=0.05)
    q.add("k")
    key = await get_now(q)
    began = time.monotonic()
    q.add_rate_limited(key)
    q.done(key)
    assert len(q) == 0
    assert await get_now(q) == "k"
    assert time.monotonic() - began >= 0.045
    q.forget(key)
    q.done(key)


async def test_workqueue_close_wakes_getters():
    q = WorkQueue()
    q.add_after("later", 10)
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 1)
    q.add("ignored")
    assert len(q) == 0
