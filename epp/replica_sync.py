"""Speculative KV-index entries shared between picker replicas.

Every replica hears every pod's KV events, so their indexes agree on what the pods hold. What
they do not share by themselves is the window before a pod's BlockStored arrives: the picker
that chose a pod for a prompt holds its blocks as speculative entries (kvindex.cache), and a
request with the same prefix that Envoy hands to another replica in that window would not
see them and might go elsewhere, splitting the prefix over two pods. Under load the window is
a queue wait plus a prefill, long enough to matter (bench/routing with two replicas).

So each replica publishes its speculative adds (pod address, the prompt's block keys) on a
ZMQ PUB it binds, and subscribes to every peer's; an add heard from a peer goes into the local
index as the same kind of speculative entry, expiring unless the pod's events confirm it. The
keys are our chained request keys (kvindex.keys), computed alike by every replica. A message
is [pod address, keys] in msgpack. Peers are trusted by address (loopback in the local stack,
a NetworkPolicy in a cluster), yet a bad message is counted and dropped: an unknown pod, a
malformed frame, more keys than a prompt can have.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

log = logging.getLogger("epp.replica_sync")

MAX_KEYS = 65_536  # a 1M-token prompt in 16-token blocks
MAX_MESSAGE_BYTES = 16 + 10 * MAX_KEYS + 512
SEND_HWM = 10_000  # messages queued per peer before new ones are dropped (a slow peer)


class SpeculativeAdd(msgspec.Struct, array_like=True, frozen=True):
    pod: str
    keys: list[int]


class ReplicaSync:
    """One replica's side: publish its speculative adds, apply its peers'."""

    def __init__(
        self,
        bind: str,
        peers: list[str],
        apply: Callable[[str, list[int]], None],
        is_member: Callable[[str], bool],
    ) -> None:
        self.bind = bind
        self.peers = [p for p in peers if p != bind]
        self._apply = apply
        self._is_member = is_member
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(SpeculativeAdd).decode
        self.counts: Counter[str] = Counter()  # published, applied, and why not: reasons

    def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, SEND_HWM)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(self.bind)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger frame drops the peer
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        for peer in self.peers:
            sub.connect(peer)
        self._pub, self._sub = pub, sub
        self._task = asyncio.create_task(self._receive())
        log.info("sharing speculative KV entries on %s with %s", self.bind, self.peers or "none")

    def publish(self, pod: str, keys: list[int]) -> None:
        """Tell the peers (never blocks: a message a slow peer cannot take is dropped)."""
        if self._pub is None or not keys or len(keys) > MAX_KEYS:
            return
        try:
            self._pub.send(self._encode(SpeculativeAdd(pod, keys)), zmq.NOBLOCK)
            self.counts["published"] += 1
        except zmq.Again:
            self.counts["send_dropped"] += 1

    def handle(self, frame: bytes) -> None:
        """Apply one peer message, or count why not."""
        try:
            add = self._decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counts["malformed"] += 1
            return
        if not add.keys or len(add.keys) > MAX_KEYS:
            self.counts["bad_keys"] += 1
        elif any(not 0 <= k < 2**64 for k in add.keys):
            self.counts["bad_keys"] += 1
        elif not self._is_member(add.pod):
            self.counts["unknown_pod"] += 1
        else:
            self._apply(add.pod, add.keys)
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
