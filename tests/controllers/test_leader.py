"""Leader election over a Lease, on the in-memory store and through the official client
to the API emulator: one leader at a time, a standby takes over when the leader stops
renewing or hands the Lease back."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client

from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import LEASE, Unavailable
from infergw.controllers.leader import LeaderElector, _fmt, _now
from infergw.controllers.memory_store import MemoryStore
from tests.kubeapi import KubeAPIEmulator


@pytest.fixture(params=["memory", "kube"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    async with KubeAPIEmulator() as api:
        s = KubeStore(client.ApiClient(api.client_configuration()))
        try:
            yield s
        finally:
            s.close()


def elector(store, who: str, **kw) -> LeaderElector:
    kw = {"lease_duration": 1.0, "renew_every": 0.2, "retry_every": 0.1, **kw}
    return LeaderElector(
        store, name="infergate-controllers", namespace="default", identity=who, **kw
    )


async def test_one_leader_then_a_takeover_when_it_stops_renewing(store):
    a, b = elector(store, "a"), elector(store, "b")
    await asyncio.wait_for(a.acquire(), 5)
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(1.5)  # b keeps trying while a renews
    assert not waiting.done()
    lease = await store.get(LEASE, "default", "infergate-controllers")
    assert lease["spec"]["holderIdentity"] == "a"
    a._task.cancel()  # a hangs: no more renewals
    await asyncio.wait_for(waiting, 5)
    lease = await store.get(LEASE, "default", "infergate-controllers")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    await b.release()


async def test_a_released_lease_is_taken_at_once(store):
    a, b = elector(store, "a", lease_duration=30.0), elector(store, "b", lease_duration=30.0)
    await a.acquire()
    await a.release()
    await asyncio.wait_for(b.acquire(), 3)  # far sooner than the 30 s lease
    await b.release()


async def test_a_leader_that_cannot_renew_reports_the_loss(store):
    a = elector(store, "a")
    await a.acquire()
    lease = await store.get(LEASE, "default", "infergate-controllers")
    lease["spec"]["holderIdentity"] = "usurper"  # someone else took it and keeps it fresh
    await store.update(lease)

    async def keep_fresh():
        while True:
            lease = await store.get(LEASE, "default", "infergate-controllers")
            lease["spec"]["renewTime"] = _fmt(_now())
            await store.update(lease)
            await asyncio.sleep(0.1)

    usurper = asyncio.create_task(keep_fresh())
    try:
        await asyncio.wait_for(a.lost.wait(), 5)
    finally:
        usurper.cancel()
        await asyncio.gather(usurper, return_exceptions=True)


class FlakyStore:
    """A real store whose first reads fail as an API server that is briefly away does."""

    def __init__(self, inner, failures: int) -> None:
        self.inner, self.failures = inner, failures

    async def get(self, *args):
        if self.failures:
            self.failures -= 1
            raise Unavailable("connection refused")
        return await self.inner.get(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_candidate_keeps_trying_through_api_errors():
    store = FlakyStore(MemoryStore(), failures=3)
    a = elector(store, "a")
    await asyncio.wait_for(a.acquire(), 5)  # three failed reads, then the lease
    lease = await store.get(LEASE, "default", "infergate-controllers")
    assert lease["spec"]["holderIdentity"] == "a" and store.failures == 0
    await a.release()
