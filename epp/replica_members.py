"""Which picker replicas are alive now, and which of them owns a pod.

Work that every replica would otherwise repeat per pod — ingesting its KV events into the
shared index (epp/kv_shards.py), scraping its /metrics (epp/scrape_shares.py) — is done by one
replica, the pod's **owner**: rendezvous hashing of (replica, pod) over the **live replicas**,
this one and the peers of the replica sync (`--replica-sync-peers`, or a cluster's
EndpointSlices through `--replica-sync-discovery`) it has heard a heartbeat from within
`liveness` seconds. Each replica publishes its heartbeat (its `--replica-sync-bind`) every
`interval` on the sync's channel `replica-alive`; a heartbeat is believed only from a replica
this one follows (its bind is one of the sync's peers), so discovery decides who may be a
member and heartbeats say who is alive now. Every replica computes the same owner from the
same live set; a pod moves only when its owner joins or leaves (1/N of the pods, no more).

Why owners and not one leader under a Lease: no election (nor RBAC for Leases, nor a handover
that loses what happened between the old leader's last act and the new one's first), the work
is spread over the replicas, and a replica's death moves only its own pods. While two
replicas' live sets differ (a heartbeat lost, a replica just started) a pod may have two
owners or, after its owner died and until the heartbeat expires, none: each user says what
that costs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from infergw.epp.replica_sync import ReplicaSync

log = logging.getLogger("epp.replica_members")

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
    """The replica that owns `pod`: the highest weight (ties by name, never happen)."""
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


class ReplicaMembers:
    """Pulses this replica's heartbeat, rechecks the live set every `interval`, answers `owns`,
    and calls each listener after every check (whether or not the set changed: a listener
    also catches up with pods that joined the pool meanwhile). One per replica sync."""

    def __init__(
        self,
        sync: ReplicaSync | None,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        liveness: float = LIVENESS,
    ) -> None:
        self.interval = interval
        me = sync.bind if sync is not None else "this replica"
        peers: Callable[[], Iterable[str]] = (lambda: sync.peers) if sync is not None else tuple
        self.live = LiveReplicas(me, peers, liveness)
        self._beat = (
            sync.channel(HEARTBEAT_CHANNEL, self._heard, about_pods=False) if sync else None
        )
        self._members: list[str] = []  # none until the first check: nothing is ours yet
        self._owned: dict[str, bool] = {}  # pod → ours, for the current members
        self.listeners: list[Callable[[], None]] = []
        self.changes: Counter[str] = Counter()  # members_changed
        self._task: asyncio.Task | None = None

    def _heard(self, replica: str, _keys: list[int]) -> None:
        self.live.heard(replica)

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def owns(self, pod: str) -> bool:
        ours = self._owned.get(pod)
        if ours is None:
            ours = bool(self._members) and owner(pod, self._members) == self.live.me
            if len(self._owned) >= MAX_CACHED:
                self._owned.clear()  # pods that left the pool; recomputed as asked
            self._owned[pod] = ours
        return ours

    def owner_of(self, pod: str) -> str | None:
        """The replica that owns `pod` now; None before the first check."""
        return owner(pod, self._members) if self._members else None

    def start(self) -> None:
        """Start the heartbeat and the checks (again: nothing more)."""
        if self._task is None:
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
            except Exception:  # a bug must not freeze the owners: log it, check again
                log.exception("replica members: the ownership check failed")
            await asyncio.sleep(self.interval)

    def check(self) -> None:
        """Recompute the live replicas, then tell the listeners."""
        members = self.live.members()
        if members != self._members:
            log.info("live picker replicas %s (were %s)", members, self._members)
            self._members = members
            self._owned.clear()
            self.changes["members_changed"] += 1
        for listener in self.listeners:
            listener()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def collect(self):
        """Prometheus: the live replicas sharing the pods' work, and how often that set changed."""
        yield GaugeMetricFamily(
            "infergate_epp_replicas_live",
            "Picker replicas (this one included) the pods' work (KV-event ingestion into a "
            "shared index, metrics scraping) is shared over.",
            value=len(self._members),
        )
        changes = CounterMetricFamily(
            "infergate_epp_replica_member_changes",
            "Times the live replicas changed (members_changed: a replica joined or left), and "
            "heartbeats ignored (heartbeat_ignored: from a replica this one does not follow).",
            labels=["change"],
        )
        for change, n in sorted(self.changes.items()):
            changes.add_metric([change], n)
        changes.add_metric(["heartbeat_ignored"], self.live.ignored)
        yield changes
