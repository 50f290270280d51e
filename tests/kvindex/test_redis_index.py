"""The shared KV index in Redis (kvindex.redis_index) against a real redis-server: it holds what
the in-memory index holds (the recorded vLLM events, the fuzz storms), pickers sharing one Redis
see each other's blocks, and a dead or hostile Redis reads as "no hits", counted, never an
exception or a wait past the lookup's deadline."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from infergw.epp.ratelimit.redis_backend import redis_client
from infergw.kvindex.cache import KVCache
from infergw.kvindex.events import BlockRemoved, BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import block_keys, model_root
from infergw.kvindex.redis_index import (
    KEY_PREFIX,
    RedisIndexMetrics,
    RedisIndexWriter,
    RedisPrefixIndex,
    block_key,
)
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.kvindex.translate import EventTranslator
from tests import kv_storms
from tests.kv_recordings import recorded_batches, recorded_lines, request
from tests.paths import TINY_MODEL
from tests.redis_fakes import FakeRedis, resp
from tests.redis_server import redis_server_fixture  # noqa: F401

POD, MODEL = "127.0.0.1:8300", "tiny"
A, B = "10.0.0.1:8000", "10.0.0.2:8000"
WEIGHTS = {"gpu": 1.0, "cpu": 0.8}


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class Shared:
    """One replica of the shared index: a writer (translator over a local index mirrored to
    Redis) and a reader, on their own client."""

    def __init__(self, address: str, *, timeout: float = 0.5, retry: float = 0.2) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RedisIndexMetrics(self.registry)
        self.client: Redis = redis_client(address, timeout=2.0, max_reply_bytes=1 << 22)
        self.local = KVBlockIndex(max_entries=10_000_000)
        self.writer = RedisIndexWriter(
            self.local, self.client, metrics=self.metrics, retry_interval=retry
        )
        self.translator = EventTranslator(self.writer)
        self.reader = RedisPrefixIndex(
            self.client, timeout=timeout, retry_interval=retry, metrics=self.metrics
        )

    async def close(self) -> None:
        await self.client.aclose()


async def redis_holdings(client: Redis) -> dict[str, dict[str, set[int]]]:
    """pod → tier → keys, read back from Redis as lookups see them (entries written before
    the pod's clear are dead)."""
    cleared = {
        k.decode(): int(v) for k, v in (await client.hgetall(f"{KEY_PREFIX}:cleared")).items()
    }
    out: dict[str, dict[str, set[int]]] = {}
    async for name in client.scan_iter(match=f"{KEY_PREFIX}:b:*", count=1000):
        key = int(name.decode().rsplit(":", 1)[1], 16)
        for pod, v in (await client.hgetall(name)).items():
            pod = pod.decode()
            bits, stamp = int(v[:1]), int(v[1:])
            if stamp <= cleared.get(pod, -1):
                continue
            tiers = out.setdefault(pod, {"gpu": set(), "cpu": set()})
            for tier, bit in (("gpu", 1), ("cpu", 2)):
                if bits & bit:
                    tiers[tier].add(key)
    return out


def all_block_keys(shared: Shared):
    return shared.client.scan_iter(match=f"{KEY_PREFIX}:b:*", count=1000)


def memory_holdings(index: KVBlockIndex, pods) -> dict[str, dict[str, set[int]]]:
    out = {}
    for pod in pods:
        tiers = {t: index.keys_of(pod, t) for t in ("gpu", "cpu")}
        if tiers["gpu"] or tiers["cpu"]:
            out[pod] = tiers
    return out


@pytest.fixture(scope="module")
def tokenizers():
    return PromptTokenizers({MODEL: TINY_MODEL})


def prompts(kv: KVCache):
    """The recorded requests' prompts, and prefixes of them (a lookup ending mid-chain)."""
    out = []
    for row in recorded_lines("requests.jsonl"):
        req = request(row["path"], row["body"])
        prompt = kv.prompt(req, req.request.body.cache_salt)
        if prompt is not None and prompt.keys:
            out.append(prompt)
    return out


async def test_recorded_events_read_back_equal_to_the_in_memory_index(redis_server, tokenizers):
    shared = Shared(redis_server.address)
    memory = KVBlockIndex(max_entries=10_000_000)
    mem_translator = EventTranslator(memory)
    mem_kv = KVCache(tokenizers=tokenizers, index=memory)
    shared_kv = KVCache(tokenizers=tokenizers, index=shared.reader)
    wanted = prompts(mem_kv)
    assert wanted, "the recording has prompts"
    try:
        hits = 0
        for batch in recorded_batches():  # compared after each batch: stores and removals
            for ev in batch.events:
                mem_translator.apply(POD, MODEL, ev)
                shared.translator.apply(POD, MODEL, ev)
            assert await shared.writer.flush()
            assert await redis_holdings(shared.client) == memory_holdings(memory, [POD])
            for prompt in wanted:
                fetched = await shared_kv.fetch(prompt)
                for keys in (prompt.keys, prompt.keys[: len(prompt.keys) // 2]):
                    p = type(prompt)(prompt.tokens, keys)
                    f = type(prompt)(prompt.tokens, keys, fetched.held)
                    assert shared_kv.score(f, [POD, A], WEIGHTS) == pytest.approx(
                        mem_kv.score(p, [POD, A], WEIGHTS)
                    )
                    assert shared_kv.matched_blocks(f, [POD]) == mem_kv.matched_blocks(p, [POD])
                hits += mem_kv.matched_blocks(prompt, [POD])[POD] > 0
        assert hits, "some recorded prompt is held at some point"
        # An engine reset: everything the pod held is gone for lookups at once.
        shared.translator.clear_pod(POD)
        mem_translator.clear_pod(POD)
        assert await shared.writer.flush()
        assert await redis_holdings(shared.client) == {}
        fetched = await shared_kv.fetch(wanted[0])
        assert shared_kv.matched_blocks(fetched, [POD]) == {POD: 0}
    finally:
        await shared.close()


class _SharedReference(kv_storms.Reference):
    """The fuzz test's reference rules (sequence numbers, clears), applied to any index."""

    def __init__(self, index) -> None:
        super().__init__()
        self.index = index
        self.sink = EventTranslator(index)


async def test_fuzz_storms_leave_redis_equal_to_the_in_memory_reference(redis_server):
    shared = Shared(redis_server.address)
    mem_ref = kv_storms.Reference()
    shared_ref = _SharedReference(shared.writer)
    seq, seen = [0], 0
    try:
        for seed in range(6):
            for frames in kv_storms.storm(random.Random(seed), seq):
                mem_ref.feed(frames)
                shared_ref.feed(frames)
            assert await shared.writer.flush()
            want = memory_holdings(mem_ref.index, [kv_storms.STORM])
            assert await redis_holdings(shared.client) == want
            # Lookups agree too, on keys written before a clear (dead) as well as live ones.
            held = mem_ref.index.keys_of(kv_storms.STORM)
            seen += bool(held)
            every = [int(n.decode().rsplit(":", 1)[1], 16) async for n in all_block_keys(shared)]
            for k in random.Random(seed).sample(every, min(100, len(every))):
                got = (await shared.reader.fetch([k])).match_lengths([k], [kv_storms.STORM])
                assert got == {kv_storms.STORM: int(k in held)}
        assert seen, "some storm leaves entries"
    finally:
        await shared.close()


def _store(parent, hashes, tokens, medium="GPU"):
    return BlockStored(tuple(hashes), parent, tuple(tokens), 16, medium=medium)


async def test_two_pickers_sharing_one_redis_see_each_others_blocks(redis_server):
    one, two = Shared(redis_server.address), Shared(redis_server.address)
    tokens_a, tokens_b = list(range(64)), list(range(1000, 1064))
    try:
        one.translator.apply(A, MODEL, _store(None, [1, 2, 3, 4], tokens_a))
        two.translator.apply(B, MODEL, _store(None, [5, 6, 7, 8], tokens_b))
        # Both subscribe to A too (per-pod mode): the same writes, idempotent.
        two.translator.apply(A, MODEL, _store(None, [1, 2, 3, 4], tokens_a))
        assert await one.writer.flush() and await two.writer.flush()
        keys_a = sorted(one.local.keys_of(A))
        chain_a = block_keys(tokens_a, 16, parent=model_root(MODEL, None))
        chain_b = block_keys(tokens_b, 16, parent=model_root(MODEL, None))
        assert sorted(chain_a) == keys_a
        for reader in (one.reader, two.reader):
            held_a = await reader.fetch(chain_a)
            held_b = await reader.fetch(chain_b)
            assert held_a.match_lengths(chain_a, [A, B]) == {A: 4, B: 0}
            assert held_b.match_lengths(chain_b, [A, B]) == {A: 0, B: 4}
        # One replica's removal (the other has not applied it yet) and then the other's.
        removed = BlockRemoved((3, 4))
        one.translator.apply(A, MODEL, removed)
        assert await one.writer.flush()
        assert (await two.reader.fetch(chain_a)).match_lengths(chain_a, [A]) == {A: 2}
        two.translator.apply(A, MODEL, removed)
        assert await two.writer.flush()
        assert (await one.reader.fetch(chain_a)).match_lengths(chain_a, [A]) == {A: 2}
        # Speculative entries stay in the replica that routed.
        one.reader.add_speculative(B, chain_a)
        assert (await one.reader.fetch(chain_a)).match_lengths(chain_a, [B]) == {B: 4}
        assert (await two.reader.fetch(chain_a)).match_lengths(chain_a, [B]) == {B: 0}
    finally:
        await one.close()
        await two.close()


async def test_redis_killed_mid_run_reads_as_no_hits_then_recovers(redis_server, caplog):
    shared = Shared(redis_server.address, timeout=0.2, retry=0.2)
    tokens = list(range(64))
    chain = block_keys(tokens, 16, parent=model_root(MODEL, None))
    try:
        shared.translator.apply(A, MODEL, _store(None, [1, 2, 3, 4], tokens))
        assert await shared.writer.flush()
        assert (await shared.reader.fetch(chain)).match_lengths(chain, [A]) == {A: 4}

        redis_server.stop()
        t0 = time.monotonic()
        held = await shared.reader.fetch(chain)
        assert time.monotonic() - t0 < 1.0  # the lookup's deadline, not a stuck request
        assert held.match_lengths(chain, [A]) == {A: 0}
        assert held.lookup(chain, [A], tier_weights=WEIGHTS) == {A: 0.0}
        assert value(shared.registry, "infergate_kvindex_redis_lookups_total", result="failed") == 1
        errors = sum(
            value(shared.registry, "infergate_kvindex_redis_errors_total", op="lookup", reason=r)
            for r in ("connection", "timeout")
        )
        assert errors == 1
        assert "lookups answer no hits" in caplog.text
        # Inside the retry window Redis is not asked at all.
        assert (await shared.reader.fetch(chain)).match_lengths(chain, [A]) == {A: 0}
        skipped = value(shared.registry, "infergate_kvindex_redis_lookups_total", result="skipped")
        assert skipped == 1
        # Writes while it is down are kept.
        shared.translator.apply(B, MODEL, _store(None, [5, 6, 7, 8], tokens))
        assert not await shared.writer.flush()
        assert shared.writer.pending > 0

        redis_server.start()  # empty: it kept nothing (no persistence)
        await asyncio.sleep(0.25)  # past the retry window
        assert await shared.writer.flush()
        assert shared.writer.pending == 0
        held = await shared.reader.fetch(chain)
        assert held.match_lengths(chain, [A, B]) == {A: 0, B: 4}
        assert "works again" in caplog.text
    finally:
        await shared.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"*3\r\n" + resp(b"pod") + resp(b"1") + resp(b"x"),  # odd pairs
        resp([b"pod", b"19"]),  # a tier digit out of range
        resp([b"pod", b"1" * 9]),  # a run longer than the keys asked
        resp([1, 2]),
        ("+", "OK"),
        ("-", "ERR nope"),
        b"*1000000\r\n" + resp(1) * 100_000,  # far over the reply bound
    ],
    ids=["odd", "digit", "long", "ints", "simple", "error", "huge"],
)
async def test_a_hostile_reply_reads_as_no_hits_and_is_counted(reply):
    server = FakeRedis()
    server.replies = [reply if isinstance(reply, bytes) else resp(reply)]
    await server.start()
    registry = CollectorRegistry()
    client = redis_client(server.address, timeout=0.5, max_reply_bytes=64 * 1024)
    reader = RedisPrefixIndex(client, timeout=0.5, metrics=RedisIndexMetrics(registry))
    keys = list(range(4))
    try:
        t0 = time.monotonic()
        held = await reader.fetch(keys)
        assert time.monotonic() - t0 < 1.0
        assert held.match_lengths(keys, ["pod"]) == {"pod": 0}
        assert value(registry, "infergate_kvindex_redis_lookups_total", result="failed") == 1
        assert not reader.available
    finally:
        await client.aclose()
        await server.stop()


async def test_write_ops_compose_and_a_clear_supersedes_older_writes(redis_server):
    shared = Shared(redis_server.address)
    client = shared.client
    try:
        writer = shared.writer
        writer.add(A, [10, 11], "gpu")
        writer.add(A, [10], "cpu")
        writer.remove(A, [11], "gpu")
        assert await writer.flush()
        holdings = await redis_holdings(client)
        assert holdings == {A: {"gpu": {10}, "cpu": {10}}}
        writer.remove(A, [10], "gpu")  # the CPU copy stays: gpu bit cleared only
        assert await writer.flush()
        assert await redis_holdings(client) == {A: {"gpu": set(), "cpu": {10}}}
        writer.clear_pod(A)
        writer.add(A, [12], "gpu")  # after the clear: alive
        assert await writer.flush()
        assert await redis_holdings(client) == {A: {"gpu": {12}, "cpu": set()}}
        held = await shared.reader.fetch([10, 12])
        assert held.match_lengths([10, 12], [A]) == {A: 0}  # 10 was written before the clear
        assert (await shared.reader.fetch([12])).match_lengths([12], [A]) == {A: 1}
        assert await client.ttl(block_key(KEY_PREFIX, 12)) > 0  # every write bounds its life
    finally:
        await shared.close()
