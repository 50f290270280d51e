"""vLLM's KV-event publisher: a ZMQ PUB socket plus a ROUTER socket that replays buffered batches.

Frames are [topic, seq as 8-byte big-endian, msgpack payload]; the payload is the batch
[ts, [events...], data_parallel_rank]. Events are maps with a "type" key (vLLM >= 0.26) or,
with --kv-events-format array, the older positional arrays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

from infergw.simulator.block_pool import ClearedEvent, KVEvent, RemovedEvent, StoredEvent
from infergw.simulator.config import KVEventsConfig

log = logging.getLogger("simulator.kv_events")

REPLAY_END = (2**64 - 1).to_bytes(8, "big")
_encoder = msgspec.msgpack.Encoder()


def encode_event(event: KVEvent, fmt: str = "map") -> dict | list:
    if isinstance(event, StoredEvent):
        fields = {
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": "GPU",
            "lora_name": event.lora_name,
            # One entry per block: the LoRA name in each, the cache salt in a request's first.
            "extra_keys": [list(k) if k else None for k in event.extra_keys],
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
        tag = "BlockStored"
    elif isinstance(event, RemovedEvent):
        fields = {"block_hashes": list(event.block_hashes), "medium": "GPU", "group_idx": 0}
        tag = "BlockRemoved"
    elif isinstance(event, ClearedEvent):
        fields, tag = {}, "AllBlocksCleared"
    else:  # pragma: no cover - the pool only makes the three kinds
        raise TypeError(f"not a KV event: {event!r}")
    if fmt == "array":
        return [tag, *fields.values()]
    return {"type": tag, **fields}


def encode_batch(events: list[KVEvent], fmt: str = "map", dp_rank: int = 0) -> bytes:
    return _encoder.encode([time.time(), [encode_event(e, fmt) for e in events], dp_rank])


def _binds(endpoint: str) -> bool:
    # vLLM binds wildcard and local transports and connects to anything else.
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    def __init__(self, cfg: KVEventsConfig, fmt: str = "map", *, bind: bool = False) -> None:
        self.cfg = cfg
        self.fmt = fmt
        self.topic = cfg.topic.encode()
        self.seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        # A plain socket for PUB: a non-blocking send needs no event loop, and an asyncio
        # socket would defer it to a future nobody awaits.
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        binds = bind or _binds(cfg.endpoint)
        if binds:
            self._pub.bind(cfg.endpoint)
        else:
            self._pub.connect(cfg.endpoint)
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None
        if cfg.replay_endpoint:
            self._router = self._actx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(cfg.replay_endpoint)
        log.info(
            "KV events: PUB %s %s, replay %s, topic %r, format %s",
            "bound to" if binds else "connected to",
            cfg.endpoint,
            cfg.replay_endpoint or "off",
            cfg.topic,
            fmt,
        )

    def start(self) -> None:
        if self._router is not None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[KVEvent]) -> None:
        payload = encode_batch(events, self.fmt)
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        try:
            # PUB never blocks: past the high-water mark ZMQ drops, as vLLM's publisher does.
            self._pub.send_multipart(
                [self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            log.warning("KV event batch seq=%d dropped: subscriber queue full", seq)

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            # vLLM's ROUTER accepts exactly [identity, b"", start_seq].
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning("replay: ignoring malformed request with %d frames", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._router.send_multipart(
                        [identity, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    )
            # The end marker keeps the (empty) topic frame, as vLLM 0.32 sends it.
            await self._router.send_multipart([identity, b"", b"", REPLAY_END, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except asyncio.CancelledError:
                pass
        self._pub.close(0)
        if self._router is not None:
            self._router.close(0)
        self._ctx.term()
        self._actx.term()
