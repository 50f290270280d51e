"""cluster/informer.py beyond the store contract (tests/test_controllers_store.py): following a
new label selector, periodic resync, objects it cannot use, coalesced change listeners."""

from __future__ import annotations

import asyncio
import logging

import pytest

from infergw.cluster.informer import Informer
from infergw.cluster.pool import pod_problem
from infergw.cluster.store import POD, Kind, Unavailable
from infergw.controllers.memory_store import MemoryStore
from tests.waiting import wait_for_async


def pod(name: str, **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
    }


def names(informer: Informer) -> set[str]:
    return {o["metadata"]["name"] for o in informer.items()}


async def test_select_follows_a_new_selector_and_drops_what_no_longer_matches():
    store = MemoryStore()
    for name, app in (("a", "blue"), ("b", "blue"), ("c", "green")):
        await store.create(pod(name, app=app))
    informer = Informer(store, POD, "default", labels={"app": "blue"})
    seen: list[tuple[str, str]] = []
    informer.add_handler(lambda event, obj: seen.append((event, obj["metadata"]["name"])))
    await informer.list_first()
    informer.start()
    try:
        assert names(informer) == {"a", "b"}
        await store.create(pod("d", app="green"))  # not selected yet
        await store.create(pod("e", app="blue"))
        await wait_for_async(lambda: "e" in names(informer), within=2)
        assert "d" not in names(informer)
        informer.select({"app": "green"})
        await wait_for_async(lambda: names(informer) == {"c", "d"}, within=2)
        assert {("DELETED", "a"), ("DELETED", "b"), ("ADDED", "c")} <= set(seen)
        await store.create(pod("f", app="green"))  # and it watches with the new selector
        await wait_for_async(lambda: "f" in names(informer), within=2)
    finally:
        await informer.stop()


class CountingStore(MemoryStore):
    lists = 0

    async def list(self, kind, namespace=None, labels=None):
        self.lists += 1
        return await super().list(kind, namespace, labels)


async def test_resync_lists_again_without_any_error(caplog):
    caplog.set_level(logging.INFO, logger="cluster.informer")
    store = CountingStore()
    informer = Informer(store, POD, "default", resync=0.1)
    informer.start()
    try:
        await wait_for_async(lambda: store.lists >= 3, within=3)
        assert "re-listed pods" in caplog.text and "WARNING" not in caplog.text
    finally:
        await informer.stop()


class ScriptedStore:
    """A store whose list and single watch answer what the test says; the watch then waits."""

    def __init__(self, items: list, events: list) -> None:
        self.items, self.events = items, events

    async def list(self, kind: Kind, namespace=None, labels=None):
        return list(self.items), "1"

    async def watch(self, kind: Kind, namespace, resource_version, labels=None):
        for event in self.events:
            yield event
        self.events = []
        await asyncio.Event().wait()


async def test_objects_it_cannot_use_are_skipped_counted_and_the_previous_kept(caplog):
    good = {"metadata": {"name": "a", "namespace": "default", "resourceVersion": "1"}}
    broken = {"metadata": {"name": "a", "namespace": "default"}, "status": {"podIP": "nope"}}
    store = ScriptedStore(
        items=[good, {"metadata": {"labels": {}}}, "not an object"],
        events=[
            ("MODIFIED", broken),  # check refuses it: the listed version stays
            ("ADDED", {"metadata": [1]}),
            ("SURPRISE", good),
            ("BOOKMARK", {"metadata": {"resourceVersion": "7"}}),
            ("ADDED", {"metadata": {"name": "b", "namespace": "default"}}),
        ],
    )
    skipped: list[str] = []
    informer = Informer(store, POD, check=pod_problem, skipped=lambda k: skipped.append(k.kind))
    await informer.list_first()
    assert names(informer) == {"a"} and len(skipped) == 2
    informer.start()
    try:
        await wait_for_async(lambda: "b" in names(informer), within=2)
        assert informer.get("default", "a") is good
        assert len(skipped) == 5 and set(skipped) == {"Pod"}
        assert "skipping Pod a (MODIFIED): status.podIP 'nope' is not an IP address" in caplog.text
        assert "unexpected event type 'SURPRISE'" in caplog.text
        assert informer._rv == "7"  # a bookmark moves the resume point
    finally:
        await informer.stop()


async def test_a_burst_of_changes_reaches_a_change_listener_once():
    store = MemoryStore()
    for i in range(20):
        await store.create(pod(f"p{i}"))
    informer = Informer(store, POD, "default")
    calls: list[int] = []
    informer.on_change(lambda: calls.append(len(informer.items())))
    await informer.list_first()
    await asyncio.sleep(0)
    assert calls == [20]


async def test_the_first_list_raises_what_the_store_raises():
    class Down(MemoryStore):
        async def list(self, kind, namespace=None, labels=None):
            raise Unavailable("connection refused")

    with pytest.raises(Unavailable):
        await Informer(Down(), POD).list_first()
