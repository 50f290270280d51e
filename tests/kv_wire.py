"""Real ZMQ plumbing for the KV-event tests (a test helper): the recorded vLLM messages, a PUB
that publishes from a chosen loopback address (as a pod at 127.0.0.N does), and waiting."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import zmq

from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.stack.ports import free_port
from tests.paths import TINY

RECORDED_TOPIC = b"kv@127.0.0.1:8300@tiny"
RECORDED_MODEL = "tiny"


def recorded_frames(topic: bytes = RECORDED_TOPIC) -> list[list[bytes]]:
    """The live messages of a real vLLM 0.32, as frames, under `topic`."""
    with open(TINY / "events.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [[topic, d["seq"].to_bytes(8, "big"), base64.b64decode(d["payload_b64"])] for d in rows]


async def until(cond: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Wait for cond() (a liveness bound, not a speed assertion)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def wait_heard(sub: KVEventSubscriber, sock: zmq.Socket) -> None:
    """Wait until the subscriber hears `sock` (a PUB drops what it sends before its
    connection is up), then forget the probes."""
    before = sub.dropped["malformed"]
    deadline = time.monotonic() + 10
    while sub.dropped["malformed"] == before:
        if time.monotonic() > deadline:
            raise AssertionError("the PUB never reached the subscriber")
        sock.send_multipart([b"kv@probe", b"", b""])
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # probes still in flight
    sub.dropped.clear()
    sub.counts.clear()


def sourced_pub(ctx: zmq.Context, src: str, sub_port: int) -> zmq.Socket:
    """A PUB connected to a SUB on 127.0.0.1:sub_port from source address `src`."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop: tests count what arrives
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{src}:0;127.0.0.1:{sub_port}")
    return sock


@asynccontextmanager
async def central_pubs(
    sub: KVEventSubscriber, sources: dict[str, str]
) -> AsyncIterator[dict[str, zmq.Socket]]:
    """`sub` bound in central mode on a free port, and a PUB per pod heard by it, each
    publishing from its source address (pod → address); all closed afterwards."""
    port = free_port()
    sub.bind(f"tcp://127.0.0.1:{port}")
    ctx = zmq.Context()
    pubs = {pod: sourced_pub(ctx, src, port) for pod, src in sources.items()}
    try:
        for sock in pubs.values():
            await wait_heard(sub, sock)
        yield pubs
    finally:
        for sock in pubs.values():
            sock.close(0)
        ctx.term()
        await sub.close()
