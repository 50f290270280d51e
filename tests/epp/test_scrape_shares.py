"""epp/scrape_shares.py: two picker replicas over a real ZMQ replica sync and real HTTP pods
that count their scrapes. Each pod is scraped by its owner alone and both replicas know its
numbers; a replica whose owner is gone scrapes for itself at once, then owns; a pod resting at
its owner stays fresh at the other until a request goes there, which wakes the owner; a shared
page that cannot be true is refused whole."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import msgspec
import pytest

from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.metrics import PickerMetrics
from infergw.epp.replica_members import ReplicaMembers, owner
from infergw.epp.replica_sync import Record, ReplicaSync
from infergw.epp.scrape import MetricsScraper
from infergw.epp.scrape_pace import QUIET
from infergw.epp.scrape_shares import PAGE_CHANNEL, ScrapeShares, SharedPage, read_page
from tests.conftest import free_port
from tests.datastores import one_pod_store
from tests.epp.metrics_pods import INTERVAL, Pod, page, serving
from tests.waiting import wait_for_async

PODS = 4
HEARTBEAT = 0.1
LIVENESS = 0.5


@dataclass
class Replica:
    bind: str
    ds: Datastore
    sync: ReplicaSync
    members: ReplicaMembers
    shares: ScrapeShares
    scraper: MetricsScraper

    def ep(self, port: int) -> Endpoint:
        ep = self.ds.endpoint(f"127.0.0.1:{port}")
        assert ep is not None
        return ep

    async def stop(self) -> None:
        await self.scraper.stop()
        await self.members.close()
        await self.sync.close()


async def replica(bind: str, peers: list[str], ports: list[int], **scraper_kw) -> Replica:
    ds = one_pod_store(*ports)
    sync = ReplicaSync(bind, peers, is_member=lambda a: ds.endpoint(a) is not None)
    members = ReplicaMembers(sync, interval=HEARTBEAT, liveness=LIVENESS)
    scraper = MetricsScraper(ds, PickerMetrics(), interval=INTERVAL, **scraper_kw)
    shares = ScrapeShares(ds, sync, members, stale_after=scraper.stale_after)
    scraper.share(shares)
    sync.start()
    members.start()
    await scraper.start()
    return Replica(bind, ds, sync, members, shares, scraper)


@asynccontextmanager
async def fleet(texts: list[str], **scraper_kw) -> AsyncIterator[tuple[list[Pod], list[Replica]]]:
    """PODS real pods serving `texts`, two replicas that have found each other and know every
    pod's numbers."""
    pods = [Pod(t) for t in texts]
    async with AsyncExitStack() as stack:
        ports = [await stack.enter_async_context(serving(p)) for p in pods]
        binds = split_binds(ports)
        replicas: list[Replica] = []
        for bind in binds:
            r = await replica(bind, [b for b in binds if b != bind], ports, **scraper_kw)
            stack.push_async_callback(r.stop)
            replicas.append(r)
        await wait_for_async(lambda: all(len(r.members.members) == 2 for r in replicas))
        await wait_for_async(
            lambda: all(not r.ep(p).stale and r.ep(p).models for r in replicas for p in ports)
        )
        for pod, port in zip(pods, ports, strict=True):
            pod.port = port
        yield pods, replicas


def split_binds(ports: list[int]) -> list[str]:
    """Two replica addresses between which rendezvous hashing splits the pods: with random
    ports one replica owns all four pods one time in eight, and the tests need both to own."""
    while True:
        binds = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
        owners = {owner(f"127.0.0.1:{port}", binds) for port in ports}
        if len(owners) == 2:
            return binds


def owner_index(replicas: list[Replica], port: int) -> int:
    o = owner(f"127.0.0.1:{port}", [r.bind for r in replicas])
    return [r.bind for r in replicas].index(o)


async def test_each_pod_is_scraped_by_its_owner_alone_and_both_replicas_know_its_numbers():
    texts = [page(running=i + 1, waiting=i) for i in range(PODS)]
    async with fleet(texts, quiet_interval=INTERVAL) as (pods, replicas):
        before = [p.scrapes for p in pods]
        fallbacks = [r.shares.fallback_rounds for r in replicas]
        await asyncio.sleep(1.0)
        scrapes = [p.scrapes - b for p, b in zip(pods, before, strict=True)]
        # One scraper's worth each (20 at 50 ms; the pods are busy, so they never rest, and the
        # quiet pace is off here), not two replicas' (40).
        assert all(10 <= n <= 26 for n in scrapes), scrapes
        assert [r.shares.fallback_rounds for r in replicas] == fallbacks
        owners = {owner_index(replicas, p.port) for p in pods}
        assert owners == {0, 1}, "rendezvous hashing gave every pod to one replica"
        for i, pod in enumerate(pods):
            for r in replicas:
                ep = r.ep(pod.port)
                assert (ep.metrics.running, ep.metrics.waiting) == (i + 1, i)
                assert not ep.stale and ep.reachable
        # The numbers follow the pod at the replica that does not scrape it.
        pod = pods[0]
        other = replicas[1 - owner_index(replicas, pod.port)]
        pod.text = page(running=9, waiting=5)
        await wait_for_async(lambda: other.ep(pod.port).metrics.running == 9, within=2.0)
        assert other.sync.counts["applied"] > 0 and other.sync.counts["bad_data"] == 0


async def test_a_replica_whose_owner_is_gone_scrapes_for_itself_then_owns_the_pods():
    texts = [page(running=1) for _ in range(PODS)]
    async with fleet(texts) as (pods, replicas):
        survivor = replicas[0]
        theirs = [p for p in pods if owner_index(replicas, p.port) == 1]
        assert theirs, "replica 1 owns no pod: split_binds should have split them"
        await replicas[1].stop()
        t0 = time.monotonic()
        before = {p.port: p.scrapes for p in theirs}
        # Within the staleness bound the survivor scrapes them itself (fallback) ...
        await wait_for_async(
            lambda: all(p.scrapes > before[p.port] + 1 for p in theirs), within=LIVENESS * 4
        )
        assert survivor.shares.fallback_rounds > 0
        # ... and once the dead replica's heartbeat expires they are its own.
        await wait_for_async(lambda: survivor.members.members == [survivor.bind], within=3.0)
        assert all(survivor.members.owns(f"127.0.0.1:{p.port}") for p in theirs)
        for p in theirs:
            p.text = page(running=7)
        await wait_for_async(
            lambda: all(survivor.ep(p.port).metrics.running == 7 for p in theirs), within=2.0
        )
        assert all(survivor.ep(p.port).reachable for p in pods)
        assert time.monotonic() - t0 < 10


async def test_a_pod_resting_at_its_owner_stays_fresh_at_the_other_until_a_request_wakes_it():
    texts = [page(running=0) for _ in range(PODS)]
    async with fleet(texts, idle_interval=30.0) as (pods, replicas):
        pod = pods[0]
        own = replicas[owner_index(replicas, pod.port)]
        other = replicas[1 - owner_index(replicas, pod.port)]
        await wait_for_async(lambda: own.scraper.resting(own.ep(pod.port)))
        ep = other.ep(pod.port)
        before = pod.scrapes
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # far past stale_after (0.25 s)
            assert not ep.stale and ep.reachable, "the shared idle pod went stale"
            await asyncio.sleep(INTERVAL / 2)
        assert pod.scrapes - before <= 1, "nobody should scrape a resting pod"
        # The other replica routes a request there: the owner scrapes at once.
        pod.text = page(running=1)
        ep.sent_since_scrape += 1
        await wait_for_async(lambda: ep.metrics.running == 1, within=2.0)
        assert own.ep(pod.port).metrics.running == 1


async def test_a_busy_pod_quiet_at_its_owner_is_woken_by_the_others_request():
    """The owner paces a busy pod nobody sends anything quietly, and the other replica, whose
    requests the owner cannot see, gets a page showing its request within a few ticks."""
    texts = [page(running=1) for _ in range(PODS)]
    kw = {"quiet_interval": 20.0, "stale_after": 30.0}
    async with fleet(texts, **kw) as (pods, replicas):
        pod = pods[0]
        own = replicas[owner_index(replicas, pod.port)]
        other = replicas[1 - owner_index(replicas, pod.port)]
        await wait_for_async(lambda: own.scraper.waiting(own.ep(pod.port)) == QUIET)
        before = pod.scrapes
        await asyncio.sleep(0.5)
        assert pod.scrapes - before <= 1, "nobody should scrape a quiet pod nobody sends to"
        ep = other.ep(pod.port)
        assert not ep.stale
        pod.text = page(running=2)
        ep.sent_since_scrape += 1  # the other replica routes a request there
        t0 = time.monotonic()
        await wait_for_async(lambda: ep.metrics.running == 2, within=2.0)
        assert time.monotonic() - t0 < 6 * INTERVAL
        assert own.ep(pod.port).metrics.running == 2


def test_a_page_from_a_replica_before_the_quiet_pace_still_reads():
    """quiet_for is the page's last field, with a default: an older replica's page (one field
    fewer) reads as 'not quiet', and an older replica reads ours without it."""
    old = msgspec.msgpack.encode(list(msgspec.structs.astuple(valid_page()))[:-1])
    assert read_page(old).quiet_for == 0.0
    quiet = read_page(msgspec.msgpack.encode(valid_page(quiet_for=0.15)))
    assert quiet.quiet_for == 0.15


def valid_page(**overrides) -> SharedPage:
    fields = dict(
        waiting=1.0,
        running=2.0,
        kv_usage=0.5,
        block_size=16,
        num_blocks=1000,
        running_loras=["a"],
        waiting_loras=[],
        max_loras=4,
        age=0.01,
        reachable=True,
        failures=0,
        rest_for=0.0,
    )
    fields.update(overrides)
    return SharedPage(**fields)


def test_a_shared_page_round_trips():
    p = valid_page()
    assert read_page(msgspec.msgpack.encode(p)) == p
    never = valid_page(age=math.inf)  # the owner has no good page yet: only reachability
    assert read_page(msgspec.msgpack.encode(never)).age == math.inf


@pytest.mark.parametrize(
    "bad",
    [
        {"waiting": math.nan},
        {"running": -1.0},
        {"running": math.inf},
        {"kv_usage": 1.5},
        {"age": -0.1},
        {"age": math.nan},
        {"rest_for": 1e9},
        {"rest_for": -1.0},
        {"quiet_for": math.inf},
        {"quiet_for": -0.1},
        {"failures": -1},
        {"block_size": -16},
        {"num_blocks": 2**63},
        {"running_loras": ["x" * 300]},
        {"waiting_loras": [f"l{i}" for i in range(5000)]},
    ],
)
def test_a_shared_page_that_cannot_be_true_is_refused(bad):
    with pytest.raises(ValueError):
        read_page(msgspec.msgpack.encode(valid_page(**bad)))


@pytest.mark.parametrize(
    "data",
    [b"\xc1", b"", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"waiting": 1})],
)
async def test_hostile_records_on_the_page_channel_are_counted_and_change_nothing(data):
    port = free_port()
    ds = one_pod_store(port)
    sync = ReplicaSync(
        f"tcp://127.0.0.1:{free_port()}", [], is_member=lambda a: ds.endpoint(a) is not None
    )
    shares = ScrapeShares(ds, sync, ReplicaMembers(sync), stale_after=0.25)
    (ep,) = ds.endpoints()
    metrics = ep.metrics
    for record in (
        Record(PAGE_CHANNEL, ep.address, [], data),
        Record(PAGE_CHANNEL, ep.address, [1, 2], msgspec.msgpack.encode(valid_page())),
        Record(PAGE_CHANNEL, "10.9.9.9:8000", [], msgspec.msgpack.encode(valid_page())),
    ):
        sync.handle(msgspec.msgpack.encode(record))
    assert ep.metrics is metrics and ep.stale
    assert sync.counts["applied"] == 0
    assert sync.counts["bad_data"] == 2  # the empty-data one and the one with keys
    assert shares.scrapes(ep)  # nothing fresh heard: this replica scrapes it itself
    await sync.close()
