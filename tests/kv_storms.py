"""Storms of KV messages mutated from the recorded real vLLM events, and a reference index fed
the messages that decode under the subscriber's sequence rules: shared by the fuzz tests of the
in-memory index and of the Redis-shared one."""

from __future__ import annotations

import random

import msgspec

from infergw.kvindex.events import AllBlocksCleared, KVEventDecodeError, decode_message
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.translate import EventTranslator
from tests.kv_wire import RECORDED_MODEL, recorded_frames

VICTIM = "127.0.0.2:8000"
STORM = "127.0.0.3:8000"  # the storm's PUB sends from 127.0.0.3
SENTINEL = "127.0.0.3:9000"  # same address, another member: proves the loop still runs
MESSAGES_PER_EXAMPLE = 500
EXAMPLES = 40  # × 500 = 20k messages in the normal run


def topic(pod: str) -> bytes:
    return f"kv@{pod}@{RECORDED_MODEL}".encode()


RECORDED = recorded_frames(topic(STORM))
HUGE_INTS = (2**64 - 1, 2**63, -(2**63), -1, 2**32)


def _random_position(rnd: random.Random, obj) -> tuple[object, object]:
    """A (container, index-or-key) of a decoded payload, by a random walk from the root."""
    node = obj
    while True:
        keys = range(len(node)) if isinstance(node, list) else list(node)
        key = rnd.choice(keys)
        child = node[key]
        if not (isinstance(child, list | dict) and child) or rnd.random() < 0.25:
            return node, key
        node = child


def _other_type(rnd: random.Random, v):
    choices = [None, True, 1.5, "s", b"b", [], {}, [1, 2], {"type": "BlockStored"}, 7]
    return rnd.choice([c for c in choices if type(c) is not type(v)])


def _mutate_payload(rnd: random.Random, payload: bytes) -> bytes:
    kind = rnd.randrange(8)
    if kind == 0:  # unchanged: valid messages must go on being applied
        return payload
    if kind == 1:  # bit flips
        b = bytearray(payload)
        for _ in range(rnd.randint(1, 8)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if kind == 2:  # truncation, or bytes after the end
        cut = rnd.randrange(len(payload))
        return payload[:cut] if rnd.random() < 0.7 else payload + payload[:cut]
    obj = msgspec.msgpack.decode(payload)
    container, key = _random_position(rnd, obj)
    if kind == 3:  # a type swap
        container[key] = _other_type(rnd, container[key])
    elif kind == 4:  # a huge or negative int
        container[key] = rnd.choice(HUGE_INTS)
    elif kind == 5:  # deep nesting, spliced as bytes (encoding it would recurse)
        container[key] = "@nest@"
        nest = b"\x91" * rnd.choice((50, 950, 5000)) + b"\xc0"
        return msgspec.msgpack.encode(obj).replace(msgspec.msgpack.encode("@nest@"), nest)
    else:  # poison token ids in a BlockStored: 2**64-1 among small ints
        for event in obj[1]:
            if isinstance(event, dict) and event.get("token_ids"):
                event["token_ids"][rnd.randrange(len(event["token_ids"]))] = 2**64 - 1
    return msgspec.msgpack.encode(obj)


def storm(rnd: random.Random, seq: list[int]) -> list[list[bytes]]:
    """MESSAGES_PER_EXAMPLE mutated messages; seq[0] is the storm pod's next number."""
    out = []
    for _ in range(MESSAGES_PER_EXAMPLE):
        base = rnd.choice(RECORDED)
        payload = _mutate_payload(rnd, base[2])
        r = rnd.random()
        if r < 0.7:
            t = topic(STORM)
        elif r < 0.8:
            t = topic(VICTIM)  # forged: this PUB is not at the victim's address
        elif r < 0.9:
            t = topic(f"10.{rnd.randrange(256)}.0.1:8000")  # not in the pool
        else:
            t = b"kv@" + rnd.randbytes(rnd.randrange(12))
        r = rnd.random()
        if r < 0.7:
            s = seq[0].to_bytes(8, "big")
            seq[0] += 1
        elif r < 0.9:
            s = rnd.randrange(2**64).to_bytes(8, "big")  # a gap or a "restart"
        else:
            s = rnd.randbytes(rnd.choice((0, 4, 9)))
        frames = [t, s, payload]
        if rnd.random() < 0.03:
            frames = frames[: rnd.randrange(1, 3)] if rnd.random() < 0.5 else [*frames, b""]
        out.append(frames)
    return out


class Reference:
    """The storm pod's entries as the subscriber's rules say they must be."""

    def __init__(self) -> None:
        self.index = KVBlockIndex(max_entries=10_000_000)
        self.sink = EventTranslator(self.index, clear_every=0)
        self.last: int | None = None

    def feed(self, frames: list[bytes]) -> None:
        if frames[0] != topic(STORM):
            return
        try:
            msg = decode_message(frames)
        except KVEventDecodeError:
            return
        if self.last is not None and msg.seq <= self.last:  # backwards: a restart
            self.sink.clear_pod(STORM)
        for event in msg.batch.events:
            if isinstance(event, AllBlocksCleared):
                self.sink.clear_pod(STORM)
            else:
                self.sink.apply(STORM, RECORDED_MODEL, event)
        self.last = msg.seq
