"""controllers/events.py: Events as client-go's events recorder aggregates them (a first
occurrence created, the second a series of 2, later ones counted and written at most every
`refresh`, a new Event after `finish` of quiet), memory bounded, writes that never fail a
reconcile; and through the API emulator, which validates Events as kube-apiserver does
(tests/kube_events.py): what the recorder writes is accepted, a malformed Event refused."""

from __future__ import annotations

import asyncio
import copy

import pytest
from kubernetes import client

from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import EVENT, Invalid, StoreError
from infergw.controllers.app import forget_event
from infergw.controllers.events import (
    FIELD_LIMIT,
    NORMAL,
    NOTE_LIMIT,
    WARNING,
    EventRecorder,
    condition_events,
)
from infergw.controllers.memory_store import MemoryStore
from tests.controller_helpers import Clock, policy
from tests.kubeapi import KubeAPIEmulator


def target(name: str = "p") -> dict:
    obj = policy()
    obj["metadata"].update(name=name, uid=f"uid-{name}")
    return obj


async def events_of(store) -> list[dict]:
    items, _ = await store.list(EVENT, "default")
    return sorted(items, key=lambda e: e["metadata"]["name"])


def recorder(store, clock: Clock, **kw) -> EventRecorder:
    return EventRecorder(store, instance="test", clock=clock, wall=lambda: 1.8e9, **kw)


async def test_repeats_become_one_series_written_on_the_second_and_every_refresh() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock, refresh=60.0, finish=300.0)
    obj = target()
    await rec.event(obj, WARNING, "MetricsUnavailable", "Scale", "pod a: refused")
    [first] = await events_of(store)
    assert "series" not in first
    assert first["regarding"]["uid"] == "uid-p" and first["type"] == WARNING
    clock.t += 10
    await rec.event(obj, WARNING, "MetricsUnavailable", "Scale", "pod a: refused")
    [second] = await events_of(store)
    assert second["metadata"]["name"] == first["metadata"]["name"]
    assert second["series"]["count"] == 2
    writes = rec.written
    for _ in range(5):  # within the refresh: counted, not written
        clock.t += 10
        await rec.event(obj, WARNING, "MetricsUnavailable", "Scale", "pod a: refused")
    assert rec.written == writes
    assert (await events_of(store))[0]["series"]["count"] == 2
    clock.t += 60  # the refresh is due: the count so far is written
    await rec.event(obj, WARNING, "MetricsUnavailable", "Scale", "pod a: refused")
    [refreshed] = await events_of(store)
    assert refreshed["series"]["count"] == 8


async def test_a_series_ends_after_finish_and_another_message_is_another_event() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock, finish=300.0)
    obj = target()
    await rec.event(obj, NORMAL, "Created", "Create", "created ModelInfer m")
    await rec.event(obj, NORMAL, "Created", "Create", "created ModelServer m")
    assert len(await events_of(store)) == 2
    clock.t += 301
    await rec.event(obj, NORMAL, "Created", "Create", "created ModelInfer m")
    events = await events_of(store)
    assert len(events) == 3 and not any("series" in e for e in events)


async def test_memory_is_bounded_and_standalone_prunes_what_it_forgets() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock, max_series=4, forget=forget_event(store))
    for i in range(20):
        await rec.event(target(f"p{i}"), WARNING, "InvalidSpec", "Reconcile", f"bad {i}")
    assert len(rec) == 4
    names = [e["regarding"]["name"] for e in await events_of(store)]
    assert sorted(names) == ["p16", "p17", "p18", "p19"]


async def test_long_fields_are_clipped_to_what_the_api_server_takes() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock)
    await rec.event(target("x" * 253), WARNING, "R" * 300, "A" * 300, "n" * 5000)
    [e] = await events_of(store)
    assert len(e["reason"]) == len(e["action"]) == FIELD_LIMIT
    assert len(e["note"]) == NOTE_LIMIT
    assert len(e["metadata"]["name"]) <= 253


async def test_fields_are_clipped_in_bytes_as_the_api_server_counts_them() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock)
    await rec.event(target(), WARNING, "é" * 100, "Reconcile", "模型" * 400 + "\ud800")
    [e] = await events_of(store)
    assert len(e["reason"].encode()) <= FIELD_LIMIT and e["reason"].startswith("é" * 60)
    assert len(e["note"].encode()) <= NOTE_LIMIT and e["note"].startswith("模型" * 100)


class Refusing(MemoryStore):
    async def create(self, obj):
        raise Invalid("refused")


async def test_a_refused_event_never_fails_the_caller() -> None:
    rec = recorder(Refusing(), Clock())
    await rec.event(target(), WARNING, "InvalidSpec", "Reconcile", "bad")
    assert rec.written == 0 and len(rec) == 0  # the next occurrence tries again


class Slow(MemoryStore):
    """A store whose writes take a while: another worker records meanwhile."""

    async def create(self, obj):
        await asyncio.sleep(0.05)
        return await super().create(obj)


async def test_two_workers_recording_the_same_thing_at_once_make_one_event() -> None:
    store = Slow()
    rec = recorder(store, Clock())
    obj = target()
    await asyncio.gather(
        *(rec.event(obj, WARNING, "InvalidSpec", "Reconcile", "bad") for _ in range(3))
    )
    assert len(await events_of(store)) == 1


async def test_condition_events_tell_transitions_only() -> None:
    store, clock = MemoryStore(), Clock()
    rec = recorder(store, clock)
    obj = target()
    ready = {"type": "Ready", "status": "False", "reason": "NoReadyPods", "message": "0/1"}
    await condition_events(rec, obj, [ready], frozenset({"NoReadyPods"}))
    obj["status"] = {"conditions": [ready]}
    await condition_events(rec, obj, [ready], frozenset({"NoReadyPods"}))  # no transition
    now = {**ready, "status": "True", "reason": "PodsReady", "message": "1/1"}
    await condition_events(rec, obj, [now], frozenset({"NoReadyPods"}))
    got = [(e["type"], e["reason"]) for e in await events_of(store)]
    assert sorted(got) == [(NORMAL, "PodsReady"), (WARNING, "NoReadyPods")]


# ---- through the API emulator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator():
    with KubeAPIEmulator().threaded() as emu:
        yield emu


async def _kube(emulator) -> KubeStore:
    return KubeStore(client.ApiClient(emulator.client_configuration()), watch_timeout=30)


def test_the_emulator_accepts_what_the_recorder_writes_and_its_series(emulator) -> None:
    async def run() -> dict:
        store = await _kube(emulator)
        try:
            rec = EventRecorder(store, refresh=0.0)  # every repeat written
            obj = target("through-api")
            for _ in range(3):
                await rec.event(obj, WARNING, "PolicyNotFound", "Scale", "policy p not found")
            return [
                e
                for e in (await store.list(EVENT, "default"))[0]
                if e["regarding"]["name"] == "through-api"
            ]
        finally:
            store.close()

    [event] = asyncio.run(run())
    assert event["series"]["count"] == 3
    assert event["reportingController"] == "infergate.io/controllers"
    assert event["eventTime"].endswith("Z")


def test_the_emulator_takes_a_long_multibyte_note_the_recorder_clipped(emulator) -> None:
    """kube-apiserver counts a note's bytes: 1,000 characters of é are 2,000 of them."""

    async def run() -> list[dict]:
        store = await _kube(emulator)
        try:
            rec = EventRecorder(store)
            await rec.event(target("multibyte"), WARNING, "Failed", "Fetch", "é" * 1000)
            items, _ = await store.list(EVENT, "default")
            return [e for e in items if e["regarding"]["name"] == "multibyte"]
        finally:
            store.close()

    [event] = asyncio.run(run())
    assert event["note"].startswith("é" * 500)


GOOD = {
    "apiVersion": "events.k8s.io/v1",
    "kind": "Event",
    "metadata": {"name": "e1", "namespace": "default"},
    "eventTime": "2026-12-07T10:00:00.000000Z",
    "reportingController": "infergate.io/controllers",
    "reportingInstance": "i",
    "action": "Scale",
    "reason": "Scaled",
    "note": "ok",
    "type": "Normal",
    "regarding": {"kind": "Model", "name": "m", "namespace": "default"},
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"eventTime": None}, "eventTime"),
        ({"type": "Error"}, "type"),
        ({"reportingController": ""}, "reportingController"),
        ({"reason": "r" * 129}, "reason"),
        ({"note": "n" * 1025}, "note"),
        ({"note": "é" * 513}, "note"),
        ({"regarding": {"kind": "Model", "name": "m", "namespace": "other"}}, "regarding"),
        ({"series": {"count": 1, "lastObservedTime": "2026-12-07T10:00:00Z"}}, "series"),
        ({"deprecatedCount": 3}, "deprecatedCount"),
    ],
)
def test_the_emulator_refuses_a_malformed_event(emulator, change, field) -> None:
    async def run() -> None:
        store = await _kube(emulator)
        try:
            body = {**copy.deepcopy(GOOD), **change}
            body["metadata"]["name"] = f"bad-{field.lower()}"
            await store.create({k: v for k, v in body.items() if v is not None})
        finally:
            store.close()

    with pytest.raises(StoreError, match=field):
        asyncio.run(run())


def test_an_event_update_may_change_only_its_series(emulator) -> None:
    async def run() -> None:
        store = await _kube(emulator)
        try:
            have = await store.create(
                {**copy.deepcopy(GOOD), "metadata": {"name": "immutable", "namespace": "default"}}
            )
            have["series"] = {"count": 2, "lastObservedTime": "2026-12-07T10:01:00.000000Z"}
            have = await store.update(have)
            have["note"] = "rewritten"
            await store.update(have)
        finally:
            store.close()

    with pytest.raises(Invalid, match="note"):
        asyncio.run(run())
