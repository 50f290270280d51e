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
    MalformedReply,
    RedisIndexMetrics,
    RedisIndexWriter,
    RedisPrefixIndex,
    parse_segments,
)
from infergw.kvindex.redis_layout import KeyLayout
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.kvindex.translate import EventTranslator
from tests import kv_storms
from tests.kv_recordings import recorded_batches, recorded_lines, request
from tests.paths import TINY_MODEL
from tests.redis_fakes import FakeRedis, resp
from tests.redis_server import redis_server_fixture  # noqa: F401
from tests.waiting import wait_for_async

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


LAYOUT = KeyLayout(KEY_PREFIX)


def _bit(bitmap: bytes, offset: int) -> bool:
    """Redis's GETBIT: bit 0 is the first byte's most significant bit."""
    return offset // 8 < len(bitmap) and bool(bitmap[offset // 8] >> (7 - offset % 8) & 1)


async def redis_holdings(client: Redis) -> dict[str, dict[str, set[int]]]:
    """pod → tier → keys, read back from Redis as lookups see them (bits of ids not live, i.e.
    retired by a clear, are dead)."""
    names = {int(i): pod.decode() for i, pod in (await client.hgetall(LAYOUT.names)).items()}
    live = await client.get(LAYOUT.live) or b""
    out: dict[str, dict[str, set[int]]] = {}
    async for name in client.scan_iter(match=f"{LAYOUT.root}:b:*", count=1000):
        key = int(name.decode().rsplit(":", 1)[1], 16)
        bitmap = await client.get(name) or b""
        for pod_id, pod in names.items():
            for tier, offset in (("gpu", 2 * pod_id + 1), ("cpu", 2 * pod_id)):
                if _bit(bitmap, offset) and _bit(live, offset):
                    tiers = out.setdefault(pod, {"gpu": set(), "cpu": set()})
                    tiers[tier].add(key)
    return out


def all_block_keys(shared: Shared):
    return shared.client.scan_iter(match=f"{LAYOUT.root}:b:*", count=1000)


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
        self.sink = EventTranslator(index, clear_every=0)


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


async def test_a_pod_handed_to_another_writer_stays_in_redis_and_a_clear_empties_it(
    redis_server,
):
    """Sharded writers (epp/kv_shards.py): the replica that lets a pod go forgets it locally
    only; the one that takes it over replays its events over what is there (idempotent) and
    follows its removals; a pod leaving the pool (clear_pod) is gone for every reader."""
    old, new = Shared(redis_server.address), Shared(redis_server.address)
    tokens = list(range(64))
    chain = block_keys(tokens, 16, parent=model_root(MODEL, None))
    stored = _store(None, [1, 2, 3, 4], tokens)
    try:
        old.translator.apply(A, MODEL, stored)
        old.translator.release_pod(A)  # its queued writes are still flushed
        assert await old.writer.flush()
        assert old.local.keys_of(A) == set() and old.translator.engine_block_size(A) is None
        for reader in (old.reader, new.reader):
            assert (await reader.fetch(chain)).match_lengths(chain, [A]) == {A: 4}
        new.translator.apply(A, MODEL, stored)  # the new owner's replay from 0
        new.translator.apply(A, MODEL, BlockRemoved((3, 4)))
        assert await new.writer.flush()
        assert (await old.reader.fetch(chain)).match_lengths(chain, [A]) == {A: 2}
        new.translator.clear_pod(A)
        assert await new.writer.flush()
        assert (await old.reader.fetch(chain)).match_lengths(chain, [A]) == {A: 0}
    finally:
        await old.close()
        await new.close()


async def test_redis_killed_mid_run_reads_as_no_hits_then_recovers(redis_server, caplog):
    # A retry window long enough that a loaded machine's stall does not end it before the
    # test looks inside it.
    shared = Shared(redis_server.address, timeout=0.2, retry=1.0)
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
        assert await shared.writer.flush()  # a flush asked for tries at once
        assert shared.writer.pending == 0

        async def answered() -> bool:
            held = await shared.reader.fetch(chain)
            return held.match_lengths(chain, [A, B]) == {A: 0, B: 4}

        # Lookups ask Redis again once their retry window has passed.
        await wait_for_async(answered, "lookups past the retry window", within=10)
        assert "works again" in caplog.text
    finally:
        await shared.close()


MALFORMED = "malformed_reply"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        pytest.param(b"*3\r\n" + resp(b"pod") + resp(b"1") + resp(b"x"), MALFORMED, id="odd"),
        pytest.param(resp([b"pod", b"19"]), MALFORMED, id="pairs"),
        pytest.param(resp([1, 2]), MALFORMED, id="ints"),
        pytest.param(resp(("+", "OK")), MALFORMED, id="simple"),
        pytest.param(resp(("-", "ERR nope")), "response", id="error"),
        pytest.param(b"*1000000\r\n" + resp(1) * 100_000, "connection", id="huge"),
        # The script's {positions, names, segments}, out of shape:
        pytest.param(resp([[2, 1], [], [1, b"\x40\x40"]]), MALFORMED, id="order"),
        pytest.param(resp([[1], [], [1, b"\x40\x40"]]), MALFORMED, id="width"),
        pytest.param(resp([[1], [], [9, b"\x40"]]), MALFORMED, id="more-keys-than-asked"),
        pytest.param(resp([[1], [], [0, b"\x40"]]), MALFORMED, id="empty-segment"),
        pytest.param(resp([[1], [5, b"pod"], [1, b"\x40"]]), MALFORMED, id="stray-id"),
        pytest.param(resp([[1], [0, 7], [1, b"\x40"]]), MALFORMED, id="name-type"),
        pytest.param(resp([[1], [0], [1, b"\x40"]]), MALFORMED, id="odd-names"),
        pytest.param(resp([[1], [0, b"pod"], []]), MALFORMED, id="no-segment"),
        pytest.param(resp([[1], [0, b"pod"], [b"1", b"\x40"]]), MALFORMED, id="count-type"),
        pytest.param(resp([[0], [0, b"pod"], [1, b"\x40"]]), MALFORMED, id="position"),
        pytest.param(resp([[1], [0, b"pod"], [1, b"\x40"], []]), MALFORMED, id="four"),
        pytest.param(resp([[1], [0, b"pod"], [1, b"\x40", 1]]), MALFORMED, id="odd-segments"),
    ],
)
async def test_a_hostile_reply_reads_as_no_hits_and_is_counted(reply, reason):
    server = FakeRedis()
    server.replies = [reply]
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
        assert held.lookup(keys) == {}
        assert value(registry, "infergate_kvindex_redis_lookups_total", result="failed") == 1
        errors = "infergate_kvindex_redis_errors_total"
        assert value(registry, errors, op="lookup", reason=reason) == 1
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
        assert await client.ttl(LAYOUT.block(12)) > 0  # every write bounds its life
    finally:
        await shared.close()


def _garbage(rng: random.Random, depth: int = 0):
    """A reply-like value: near the script's shape, or anything a RESP parser yields."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, 1, 2, 3, 4, -1, 2**63, 4096, 4097])
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    if kind == 2:
        return rng.choice([None, True, 1.5, "s", b"pod"])
    if kind == 3:
        return []
    if kind == 4:  # the script's shape, its parts mutated
        width = rng.randrange(1, 3)
        return [
            sorted(rng.sample(range(1, 5), width)),
            [rng.randrange(12), rng.choice([b"a", b"b"])] * rng.randrange(3),
            [rng.randrange(-1, 4), bytes(rng.randrange(256) for _ in range(width))]
            * rng.randrange(1, 3),
        ]
    return [_garbage(rng, depth + 1) for _ in range(rng.randrange(5))]


def test_any_reply_parses_or_is_malformed_never_another_error():
    rng = random.Random(3)
    parsed = 0
    for _ in range(5000):
        reply = _garbage(rng)
        try:
            segments = parse_segments(reply, 4)
        except MalformedReply:
            continue
        parsed += 1
        for pod in segments.columns:
            assert len(segments.run(pod, 4)) <= 4
            assert segments.scores([pod], 4, (0, 1, 1, 1))[0] <= 4
    assert parsed > 50, "some replies are well formed"


async def test_a_well_formed_segment_reply_is_read_as_sent():
    """The reply's shape, pinned: pod 0 (GPU) and pod 1 (CPU) hold 2 keys, then pod 0 alone
    holds one more in both tiers; pod 5's name has no bits at the first key: not a holder."""
    server = FakeRedis()
    # byte 1 holds ids 0..3: id 0 in bits 7 (cpu) and 6 (gpu), id 1 in bits 5 and 4.
    first, then = bytes([0b0110_0000, 0]), bytes([0b1100_0000, 0])
    server.replies = [resp([[1, 2], [0, b"a", 1, b"b", 5, b"c"], [2, first, 1, then]])]
    await server.start()
    client = redis_client(server.address, timeout=0.5, max_reply_bytes=64 * 1024)
    reader = RedisPrefixIndex(client, timeout=0.5, metrics=RedisIndexMetrics(CollectorRegistry()))
    keys = list(range(5))
    try:
        held = await reader.fetch(keys)
        assert held.match_lengths(keys) == {"a": 3, "b": 2}
        assert held.match_lengths(keys[:2], ["a", "c"]) == {"a": 2, "c": 0}
        assert held.lookup(keys, tier_weights={"gpu": 1.0, "cpu": 0.5}) == {"a": 3.0, "b": 1.0}
    finally:
        await client.aclose()
        await server.stop()


TIER_CHOICES = [("gpu",), ("cpu",), ("gpu", "cpu")]


async def test_many_pods_sharing_a_long_prefix_score_as_the_in_memory_index(redis_server):
    """Pods (ids over several bitmap bytes) hold prefixes of one long chain of different
    lengths, in changing tiers, some with holes and removals, some speculative: every lookup
    and prefix of it scores as the in-memory index holding the same."""
    shared = Shared(redis_server.address)
    memory = KVBlockIndex(max_entries=1_000_000)
    rng = random.Random(7)
    chain = [rng.getrandbits(64) for _ in range(300)]
    pods = [f"10.2.0.{i}:8000" for i in range(37)]
    holed: set[str] = set()
    try:
        for pod in pods:
            end = rng.choice([0, 1, 2, 50, 150, 299, 300])
            tier_runs = sorted(rng.sample(range(1, 300), 3))
            start = 0
            for cut in [*tier_runs, end]:
                if cut > start and start < end:
                    for tier in rng.choice(TIER_CHOICES):
                        for index in (memory, shared.writer):
                            index.add(pod, chain[start : min(cut, end)], tier)
                start = cut
            if end > 10 and rng.random() < 0.4:  # a hole, in one tier or all
                hole = chain[rng.randrange(end) : end][:3]
                tier = rng.choice(["gpu", "cpu"])
                for index in (memory, shared.writer):
                    index.remove(pod, hole, tier)
                holed.add(pod)
        # Speculative entries (this replica's, GPU) extend a run past what Redis holds. (A
        # run with a hole that a speculative key fills ends at the hole: Redis's run does.)
        for pod in rng.sample(sorted(set(pods) - holed), 4):
            spec = chain[: rng.randrange(1, 300)]
            memory.add_speculative(pod, spec)
            shared.reader.add_speculative(pod, spec)
        assert await shared.writer.flush()
        assert await redis_holdings(shared.client) == memory_holdings(shared.local, pods)
        held = await shared.reader.fetch(chain)
        for n in (300, 299, 151, 150, 50, 3, 1):
            keys = chain[:n]
            assert held.match_lengths(keys, pods) == memory.match_lengths(keys, pods)
            got = held.lookup(keys, pods, tier_weights=WEIGHTS)
            want = memory.lookup(keys, pods, tier_weights=WEIGHTS)
            assert got == pytest.approx(want)
            assert held.lookup(keys) == pytest.approx(memory.lookup(keys))
        assert max(memory.match_lengths(chain, pods).values()) == 300
    finally:
        await shared.close()


async def test_a_keyspace_of_the_old_layout_is_not_misread(redis_server):
    """Layout v1 (a hash per block key: pod → tier digit and time) under the same prefix, as a
    picker of the old version left it: the new reader sees none of it, and writes beside it."""
    shared = Shared(redis_server.address)
    chain = block_keys(list(range(64)), 16, parent=model_root(MODEL, None))
    try:
        for k in chain:
            await shared.client.hset(f"{KEY_PREFIX}:b:{k:016x}", A, "1" + "9" * 16)
        await shared.client.hset(f"{KEY_PREFIX}:cleared", A, "1")
        held = await shared.reader.fetch(chain)
        assert held.match_lengths(chain) == {}
        assert value(shared.registry, "infergate_kvindex_redis_lookups_total", result="ok") == 1
        shared.writer.add(B, chain[:2], "gpu")
        assert await shared.writer.flush()
        assert (await shared.reader.fetch(chain)).match_lengths(chain) == {B: 2}
        assert await shared.client.type(f"{KEY_PREFIX}:b:{chain[0]:016x}") == b"hash"
    finally:
        await shared.close()


async def test_a_retired_id_is_reused_only_once_its_bits_are_gone(redis_server):
    """A clear retires the pod's id; another pod gets it only after the longest TTL, and by
    then the old bits are gone: expired, or masked out where another pod's write kept the
    block alive."""
    shared = Shared(redis_server.address)
    writer = RedisIndexWriter(KVBlockIndex(), shared.client, ttl=0.6)
    client = shared.client
    try:
        writer.add(A, [1, 2], "gpu")
        writer.add(B, [2], "cpu")
        assert await writer.flush()
        a_id = int(await client.hget(LAYOUT.table[1], A))
        writer.clear_pod(A)
        writer.add(C := "10.0.0.3:8000", [7], "gpu")  # the retired id is not free yet
        assert await writer.flush()
        assert int(await client.hget(LAYOUT.table[1], C)) != a_id
        assert (await shared.reader.fetch([2])).match_lengths([2]) == {B: 1}
        await asyncio.sleep(0.3)
        writer.add(B, [2], "gpu")  # keeps block 2 alive past A's bits' TTL: masked
        assert await writer.flush()
        await asyncio.sleep(0.4)
        assert await client.pttl(LAYOUT.block(2)) > 0
        writer.add(D := "10.0.0.4:8000", [9], "gpu")
        assert await writer.flush()
        assert int(await client.hget(LAYOUT.table[1], D)) == a_id  # reused
        assert (await shared.reader.fetch([1, 2])).match_lengths([1, 2]) == {}  # expired
        assert (await shared.reader.fetch([2])).match_lengths([2], [A, B, D]) == {A: 0, B: 1, D: 0}
        assert await redis_holdings(client) == {  # C's block 7 expired too
            B: {"gpu": {2}, "cpu": {2}},
            D: {"gpu": {9}, "cpu": set()},
        }
        # A clear-only write during the mask window keeps the key's expiry (BITOP drops it).
        writer.clear_pod(C)
        writer.remove(B, [2], "cpu")
        assert await writer.flush()
        assert await client.pttl(LAYOUT.block(2)) > 0
    finally:
        await shared.close()


async def test_a_full_pod_id_table_refuses_new_pods_counted_and_frees_idle_ids(
    redis_server, caplog
):
    shared = Shared(redis_server.address)
    writer = RedisIndexWriter(
        KVBlockIndex(), shared.client, ttl=0.1, max_pod_ids=2, metrics=shared.metrics
    )
    C = "10.0.0.3:8000"
    try:
        writer.add(A, [1], "gpu")
        writer.add(B, [1], "gpu")
        assert await writer.flush()
        writer.add(C, [1, 2], "gpu")
        assert await writer.flush()  # Redis answered: the refusal is not a failure to retry
        assert writer.pending == 0
        errors = "infergate_kvindex_redis_errors_total"
        assert value(shared.registry, errors, op="write", reason="pod_ids_full") == 1
        assert value(shared.registry, "infergate_kvindex_redis_dropped_writes_total") == 2
        assert "pod-id table is full" in caplog.text
        assert (await shared.reader.fetch([1])).match_lengths([1]) == {A: 1, B: 1}
        # Once A and B have written nothing for longer than the TTL, a refused write retires
        # the least recently written; its id is free one TTL later.
        await asyncio.sleep(0.12)
        writer.add(C, [3], "gpu")
        assert await writer.flush()
        assert await shared.client.hlen(LAYOUT.table[1]) == 1
        await asyncio.sleep(0.12)
        writer.add(C, [3], "gpu")
        assert await writer.flush()
        assert (await shared.reader.fetch([3])).match_lengths([3]) == {C: 1}
    finally:
        await shared.close()
