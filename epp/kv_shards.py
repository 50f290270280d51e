"""Which picker replica subscribes to which pod's KV events, with the shared index in Redis
(`--kv-index-backend redis --kv-index-redis-shard`).

Without it every replica subscribes to every pod and writes the same changes into Redis: N
replicas do N times the KV-event work (bench/pickers: the pickers' CPU per request grew 5×
from one picker to four on two cores). Sharded, each pod's events are ingested by exactly
one replica, its **owner**, and every replica reads the whole index from Redis.

Why shards and not one writer under a Lease: no leader to elect (nor RBAC for Leases, nor a
handover that loses the events between the old leader's last flush and the new one's first),
the write load is spread over the replicas, and a replica's death moves only its own pods.

Who owns a pod: rendezvous hashing of (replica, pod) over the **live replicas** — this one and
the peers of the replica sync (`--replica-sync-peers`, or a cluster's EndpointSlices through
`--replica-sync-discovery`) it has heard a heartbeat from within `liveness` seconds. Each
replica publishes its heartbeat (its `--replica-sync-bind`) every `interval` on the sync's
channel `replica-alive`; a heartbeat is believed only from a replica this one follows (its
bind is one of the sync's peers), so discovery decides who may be a member and heartbeats say
who is alive now. Every replica computes the same owner from the same live set; a pod moves
only when its owner joins or leaves (rendezvous hashing moves 1/N of the pods, no more).

Disagreement is safe in one direction: while two replicas' live sets differ (a heartbeat
lost, a replica just started) a pod may have two owners, which both write the same idempotent
bit ops (kvindex/redis_index.py). A pod with no owner — its owner died, until its heartbeat
expires — misses events for up to `liveness` seconds; the new owner subscribes with a replay
from sequence 0 (kvindex/subscriber.py), so what the pod's replay buffer still holds is
applied, idempotently, over what the old owner wrote. The replica that lets a pod go forgets
it locally (translator maps, local index) and leaves Redis alone (`release_pod`); a pod
leaving the pool is cleared in Redis as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from infergw.epp.replica_sync import ReplicaSync

log = logging.getLogger("epp.kv_shards")

HEARTBEAT_CHANNEL = "replica-alive"
HEARTBEAT_INTERVAL = 0.5  # seconds between a replica's heartbeats, and between ownership checks
LIVENESS = 2.0  # a peer unheard this long is gone: its pods move to the others
MAX_CACHED = 65_536  # pods whose ownership is remembered between changes of the members


def canonical(endpoint: str) -> str:
    """A replica's name: its sync endpoint, an IPv6 host bracketed as discovery writes it
    (`--replica-sync-bind=tcp://$(POD_IP):9004` expands to an unbracketed one)."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return endpoint
    return f"tcp://[{ip}]:{port}" if ip.version == 6 else f"tcp://{ip}:{port}"


def weight(replica: str, pod: str) -> int:
    """The rendezvous weight of (replica, pod): the same in every process (not `hash()`)."""
    digest = hashlib.blake2b(f"{replica}\0{pod}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(pod: str, replicas: Iterable[str]) -> str:
    """The replica that subscribes to `pod`: the highest weight (ties by name, never happen)."""
    return max(replicas, key=lambda r: (weight(r, pod), r))


class LiveReplicas:
    """This replica and the peers heard from within `liveness` seconds (only those it follows)."""

    def __init__(
        self,
        me: str,
        followed: Callable[[], Iterable[str]],
        liveness: float = LIVENESS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = canonical(me)
        self._followed = lambda: {canonical(r) for r in followed()}
        self.liveness = liveness
        self._clock = clock
        self._heard: dict[str, float] = {}
        self.ignored = 0  # heartbeats from a replica this one does not follow

    def heard(self, replica: str) -> None:
        replica = canonical(replica)
        if replica == self.me:
            return
        if replica not in self._followed():
            self.ignored += 1
            return
        self._heard[replica] = self._clock()

    def members(self) -> list[str]:
        now = self._clock()
        followed = set(self._followed())
        for r in [
            r for r, t in self._heard.items() if now - t > self.liveness or r not in followed
        ]:
            del self._heard[r]
        return sorted([self.me, *self._heard])


class ShardedView(Protocol):
    """What KVShards drives (epp/kv_events.py's KVCacheView): whom it subscribes to."""

    owns: Callable[[str], bool]

    def sync_pods(self) -> None: ...


class KVShards:
    """Keeps this replica subscribed to the pods it owns: pulses its heartbeat and rechecks
    ownership every `interval`; `view` subscribes to what `owns` says (KVCacheView.owns)."""

    def __init__(
        self,
        view: ShardedView,
        sync: ReplicaSync | None,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        liveness: float = LIVENESS,
    ) -> None:
        self.view = view
        self.interval = interval
        me = sync.bind if sync is not None else "this replica"
        peers: Callable[[], Iterable[str]] = (lambda: sync.peers) if sync is not None else tuple
        self.live = LiveReplicas(me, peers, liveness)
        self._beat = (
            sync.channel(HEARTBEAT_CHANNEL, self._heard, about_pods=False) if sync else None
        )
        self._members: list[str] = []  # none until the first check: nothing is ours yet
        self._owned: dict[str, bool] = {}  # pod → ours, for the current members
        self.changes: Counter[str] = Counter()  # members_changed
        self._task: asyncio.Task | None = None
        view.owns = self.owns

    def _heard(self, replica: str, _keys: list[int]) -> None:
        self.live.heard(replica)

    def owns(self, pod: str) -> bool:
        ours = self._owned.get(pod)
        if ours is None:
            ours = bool(self._members) and owner(pod, self._members) == self.live.me
            if len(self._owned) >= MAX_CACHED:
                self._owned.clear()  # pods that left the pool; recomputed as asked
            self._owned[pod] = ours
        return ours

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # The first check waits two heartbeats, so a replica that starts beside running ones
        # hears them before it takes pods (instead of taking all, then handing most back).
        if self._beat is not None:
            self._beat(self.live.me, [1])
            await asyncio.sleep(2 * self.interval)
        while True:
            if self._beat is not None:
                self._beat(self.live.me, [1])
            try:
                self.check()
            except Exception:  # a bug must not freeze the shards: log it, check again
                log.exception("KV index shards: the ownership check failed")
            await asyncio.sleep(self.interval)

    def check(self) -> None:
        """Recompute the live replicas; when they changed, resubscribe to what is ours now."""
        members = self.live.members()
        if members != self._members:
            log.info("KV index shards: live replicas %s (were %s)", members, self._members)
            self._members = members
            self._owned.clear()
            self.changes["members_changed"] += 1
        self.view.sync_pods()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def collect(self):
        """Prometheus: the live replicas sharing the pods, and how often that set changed."""
        yield GaugeMetricFamily(
            "infergate_epp_kv_shard_replicas",
            "Picker replicas (this one included) the pods' KV-event subscriptions are shared over.",
            value=len(self._members),
        )
        changes = CounterMetricFamily(
            "infergate_epp_kv_shard_changes",
            "Times the live replicas sharing the pods changed (members_changed: a replica "
            "joined or left), and heartbeats ignored (from a replica this one does not follow).",
            labels=["change"],
        )
        for change, n in sorted(self.changes.items()):
            changes.add_metric([change], n)
        changes.add_metric(["heartbeat_ignored"], self.live.ignored)
        yield changes
