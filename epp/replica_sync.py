"""What picker replicas tell each other so that they choose alike: recent routing decisions.

Every replica hears every pod's KV events, so their indexes agree on what the pods hold. What
they do not share by themselves is the window before a pod's BlockStored arrives: the picker
that chose a pod for a prompt holds its blocks as speculative entries (kvindex.cache), and a
request with the same prefix that Envoy hands to another replica in that window would not
see them and might go elsewhere, splitting the prefix over two pods. Under load the window is
a queue wait plus a prefill, long enough to matter (bench/routing with two replicas).

The approximate prefix scorer has it worse: it knows only what it routed itself, so without
sharing, each replica learns its own map of prefixes to pods and a shared prefix is spread
over as many pods as there are replicas.

So each replica publishes its decisions on a ZMQ PUB it binds and subscribes to every peer's.
A record is [channel, pod address, keys, data] in msgpack: channel `kv-speculative` carries a
prompt's block keys (our chained request keys, kvindex.keys, computed alike by every replica)
and goes into the local index as the same kind of speculative entry, expiring unless the
pod's events confirm it; channel `approximate-prefix/<plugin name>` carries that scorer's
block hashes for its LRU; a channel made with `data_channel` carries its own msgpack
payload in `data` instead of keys (epp/scrape_shares.py: what a pod's /metrics page said).
Peers are trusted by address (loopback in the local stack, a
NetworkPolicy in a cluster), yet a bad record is counted and dropped: a malformed frame, an
unknown channel or pod, more keys than a prompt can have.

Peers are a static list (`--replica-sync-peers`, the local stack) or found at run time
(epp/replica_peers.py, a cluster): `set_peers` connects the SUB to new ones and disconnects it
from gone ones, never from this replica's own endpoint, and follows at most MAX_PEERS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import msgspec
import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("epp.replica_sync")

MAX_KEYS = 65_536  # a 1M-token prompt in 16-token blocks
MAX_DATA_BYTES = 64 * 1024  # a data channel's payload (a page's numbers and LoRA names)
MAX_MESSAGE_BYTES = 16 + 10 * MAX_KEYS + 512 + MAX_DATA_BYTES
SEND_HWM = 10_000  # messages queued per peer before new ones are dropped (a slow peer)
MAX_PEERS = 32  # a picker Deployment has a few replicas; more is a misconfiguration


Share = Callable[[str, list[int]], None]  # (pod address, keys)
ShareData = Callable[[str, bytes], None]  # (pod address, payload); raises ValueError if bad


class Record(msgspec.Struct, array_like=True, frozen=True):
    channel: str
    pod: str
    keys: list[int]
    data: bytes = b""  # a data channel's payload (then keys is empty)


class ReplicaSync:
    """One replica's side: publish its decisions, apply its peers'."""

    def __init__(self, bind: str, peers: list[str], is_member: Callable[[str], bool]) -> None:
        self.bind = bind
        self.peers: list[str] = []  # the endpoints the SUB is connected to (or will be)
        self._is_member = is_member
        self._channels: dict[str, Share] = {}
        self._data_channels: dict[str, ShareData] = {}
        self._about_replicas: set[str] = set()  # channels whose records name a replica
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Record).decode
        self.counts: Counter[str] = Counter()  # published, applied, and why not: reasons
        self.peer_changes: Counter[str] = Counter()  # connected, disconnected, over_cap, failed
        self.set_peers(peers)

    def channel(self, name: str, apply: Share, *, about_pods: bool = True) -> Share:
        """Records of one kind: peers' go to `apply`; the function returned publishes ours.
        `about_pods=False`: the record's `pod` names a replica (its bind), not a pod of the
        pool, so it is not checked against the pool (epp/kv_shards.py's heartbeats)."""
        self._take(name)
        self._channels[name] = apply
        if not about_pods:
            self._about_replicas.add(name)
        return lambda pod, keys: self.publish(name, pod, keys)

    def data_channel(self, name: str, apply: ShareData) -> ShareData:
        """Records about a pod of the pool carrying a payload: peers' go to `apply`, which
        raises ValueError for a payload it cannot use; the function returned publishes ours."""
        self._take(name)
        self._data_channels[name] = apply
        return lambda pod, data: self._send(Record(name, pod, [], data))

    def _take(self, name: str) -> None:
        if name in self._channels or name in self._data_channels:
            raise ValueError(f"replica sync channel {name!r} is taken")

    def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, SEND_HWM)
        pub.setsockopt(zmq.LINGER, 0)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger frame drops the peer
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        for sock in (pub, sub):
            sock.setsockopt(zmq.IPV6, 1)  # an IPv6 pod network; IPv4 endpoints work as before
        pub.bind(self.bind)
        self._pub, self._sub = pub, sub
        self.peers = [p for p in self.peers if self._connect(p)]
        self._task = asyncio.create_task(self._receive())
        log.info(
            "sharing routing decisions (%s) on %s with %s",
            ", ".join(self._channels) or "nothing",
            self.bind,
            self.peers or "no peer",
        )

    def set_peers(self, peers: Iterable[str]) -> None:
        """Follow these peers from now on: connect to new ones, disconnect from gone ones.
        This replica's own endpoint is left out; past MAX_PEERS the rest are (logged, counted)."""
        wanted = sorted({p for p in peers if p != self.bind})
        if len(wanted) > MAX_PEERS:
            self.peer_changes["over_cap"] += 1
            log.warning(
                "replica sync: %d peers, following the first %d (MAX_PEERS): this replica "
                "does not hear the others' decisions",
                len(wanted), MAX_PEERS,
            )  # fmt: skip
            wanted = wanted[:MAX_PEERS]
        if self._sub is None:  # not started: start() connects
            self.peers = wanted
            return
        keep = set(wanted)
        gone = [p for p in self.peers if p not in keep]
        new = [p for p in wanted if p not in self.peers]
        for peer in gone:
            try:
                self._sub.disconnect(peer)
            except zmq.ZMQError:  # never connected (it failed): nothing to undo
                pass
            self.peer_changes["disconnected"] += 1
        connected = [p for p in new if self._connect(p)]
        self.peers = sorted((set(self.peers) - set(gone)) | set(connected))
        if gone or connected:
            log.info(
                "replica sync peers: %s (connected %s, disconnected %s)",
                self.peers or "none", connected or "none", gone or "none",
            )  # fmt: skip

    def _connect(self, peer: str) -> bool:
        assert self._sub is not None
        try:
            self._sub.connect(peer)
        except zmq.ZMQError as exc:  # not an endpoint ZMQ understands
            self.peer_changes["failed"] += 1
            log.warning("replica sync: cannot connect to peer %r: %s", peer, exc)
            return False
        self.peer_changes["connected"] += 1
        return True

    def publish(self, channel: str, pod: str, keys: list[int]) -> None:
        """Tell the peers (never blocks: a message a slow peer cannot take is dropped)."""
        if not keys or len(keys) > MAX_KEYS:
            return
        self._send(Record(channel, pod, keys))

    def _send(self, record: Record) -> None:
        if self._pub is None or len(record.data) > MAX_DATA_BYTES:
            return
        try:
            self._pub.send(self._encode(record), zmq.NOBLOCK)
            self.counts["published"] += 1
        except zmq.Again:
            self.counts["send_dropped"] += 1

    def handle(self, frame: bytes) -> None:
        """Apply one peer message, or count why not."""
        try:
            record = self._decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counts["malformed"] += 1
            return
        if record.channel in self._data_channels:
            self._handle_data(record)
            return
        apply = self._channels.get(record.channel)
        if apply is None:
            self.counts["unknown_channel"] += 1
        elif not record.keys or len(record.keys) > MAX_KEYS:
            self.counts["bad_keys"] += 1
        elif any(not 0 <= k < 2**64 for k in record.keys):
            self.counts["bad_keys"] += 1
        elif record.channel in self._about_replicas:
            apply(record.pod, record.keys)
            self.counts["heard"] += 1  # a replica's record, not a decision
        elif not self._is_member(record.pod):
            self.counts["unknown_pod"] += 1
        else:
            apply(record.pod, record.keys)
            self.counts["applied"] += 1

    def _handle_data(self, record: Record) -> None:
        if record.keys or not record.data or len(record.data) > MAX_DATA_BYTES:
            self.counts["bad_data"] += 1
        elif not self._is_member(record.pod):
            self.counts["unknown_pod"] += 1
        else:
            try:
                self._data_channels[record.channel](record.pod, record.data)
            except ValueError as exc:
                self.counts["bad_data"] += 1
                log.debug(
                    "replica sync: %s record for %s refused: %s", record.channel, record.pod, exc
                )
                return
            self.counts["applied"] += 1

    async def _receive(self) -> None:
        assert self._sub is not None
        while True:
            try:
                frames = await self._sub.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                log.warning("replica sync: receive failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(frames) != 1:
                self.counts["malformed"] += 1
                continue
            self.handle(frames[0])

    def collect(self):
        """Prometheus: records published, applied, and dropped by reason."""
        family = CounterMetricFamily(
            "infergate_epp_replica_sync_records",
            "Routing decisions shared with other picker replicas (published, applied, "
            "send_dropped, malformed, unknown_channel, bad_keys, bad_data, unknown_pod; heard: the "
            "replicas' heartbeats of a sharded KV index), by outcome.",
            labels=["outcome"],
        )
        for outcome, n in sorted(self.counts.items()):
            family.add_metric([outcome], n)
        yield family
        peers = GaugeMetricFamily(
            "infergate_epp_replica_sync_peers",
            "Other picker replicas this one subscribes to.",
        )
        peers.add_metric([], len(self.peers))
        yield peers
        changes = CounterMetricFamily(
            "infergate_epp_replica_sync_peer_changes",
            "Peers connected, disconnected, failed (an endpoint ZMQ refused), and times the "
            "peer list exceeded its cap (over_cap).",
            labels=["change"],
        )
        for change, n in sorted(self.peer_changes.items()):
            changes.add_metric([change], n)
        yield changes

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()
