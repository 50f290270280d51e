"""The index keyed by the engines' own block hashes (--kv-index-keys engine): the picker hashes
prompts exactly as a real vLLM 0.32 did (its recorded events), a misconfigured picker is
detected, and hostile events do no harm."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import msgspec
import pytest
import requests
import zmq

from infergw.kvindex.cache import KVCache
from infergw.kvindex.engine_hashing import EngineHashing, EngineKeys
from infergw.kvindex.engine_translate import ROOT_MISMATCH, EngineKeyTranslator
from infergw.kvindex.events import BlockRemoved, BlockStored, KVEventDecodeError, decode_batch
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.simulator.block_hashing import BlockHasher, event_hash
from tests.conftest import free_port
from tests.kv_recordings import request
from tests.kv_subscriber import start_tiny
from tests.kv_wire import sourced_pub, until, wait_heard
from tests.paths import TINY, TINY_MODEL

POD, MODEL = "127.0.0.1:8300", "tiny"
SALTED = TINY.parent / "vllm-cpu-tiny-salt"
# How the recorded vLLM 0.32 hashed: its default algorithm, no PYTHONHASHSEED, --block-size 32.
RECORDED = EngineHashing(algo="sha256", seed=None, block_size=32)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stores(path) -> list[BlockStored]:
    return [
        ev
        for m in _rows(path / "events.jsonl")
        for ev in decode_batch(base64.b64decode(m["payload_b64"])).events
        if isinstance(ev, BlockStored)
    ]


@pytest.fixture(scope="module")
def tokenizers():
    return PromptTokenizers({MODEL: TINY_MODEL})


def picker(tokenizers, hashing: EngineHashing = RECORDED):
    engine = EngineKeys(hashing)
    index = KVBlockIndex(block_size=hashing.block_size)
    translator = EngineKeyTranslator(index, engine)
    kv = KVCache(
        tokenizers=tokenizers,
        index=index,
        engine_block_size=translator.engine_block_size,
        engine_keys=engine,
    )
    return translator, kv


def test_keys_equal_the_hashes_a_real_vllm_published():
    """Each salted or unsalted request's keys, from vLLM's own /tokenize answer, are the
    block hashes of the store its first run published."""
    rows, stores = _rows(SALTED / "requests.jsonl"), _stores(SALTED)
    engine = EngineKeys(RECORDED)
    firsts = [s for s in stores if s.parent_block_hash is None]
    assert len(firsts) == 3  # the three first-time prompts (salted a, salted b, none)
    for row, store in zip(rows, firsts, strict=False):
        keys = engine.keys(row["tokenize"]["tokens"], cache_salt=row["body"].get("cache_salt"))
        assert keys == list(store.block_hashes), row["body"].get("cache_salt")


def test_every_recorded_store_checks_out():
    """The unsalted recording too (prompts, chats, evictions): every request's first block
    hashes as the picker hashes it, and a wrong seed is told apart."""
    right = EngineKeyTranslator(KVBlockIndex(block_size=32), EngineKeys(RECORDED))
    wrong = EngineKeyTranslator(
        KVBlockIndex(block_size=32), EngineKeys(EngineHashing(seed="0", block_size=32))
    )
    for m in _rows(TINY / "events.jsonl"):
        events = decode_batch(base64.b64decode(m["payload_b64"])).events
        assert right.apply_events(POD, MODEL, events) == 0
        wrong.apply_events(POD, MODEL, events)
    checked, missed = right.root_checks()[POD]
    assert checked > 10 and missed == 0
    assert wrong.root_checks()[POD] == (checked, checked)
    assert wrong.stats()["unresolved"] == {POD: {ROOT_MISMATCH: checked}}


def test_decoding_only_first_stores_tokens_indexes_the_same():
    """decode_batch(tokens=False) keeps a request's first store's token ids (for the check)
    and counts the others'; the index ends the same as with every id decoded."""
    engine = EngineKeys(RECORDED)
    full = EngineKeyTranslator(KVBlockIndex(block_size=32), engine)
    lean = EngineKeyTranslator(KVBlockIndex(block_size=32), engine)
    continued = 0
    for m in _rows(TINY / "events.jsonl"):
        payload = base64.b64decode(m["payload_b64"])
        events = decode_batch(payload, tokens=False).events
        for ev in events:
            if isinstance(ev, BlockStored) and ev.parent_block_hash is not None:
                continued += 1
                assert ev.token_ids == () and ev.token_count == 32 * len(ev.block_hashes)
        full.apply_events(POD, MODEL, decode_batch(payload).events)
        lean.apply_events(POD, MODEL, events)
    assert continued >= 3  # the chat's second turn and the decoded tokens' blocks
    assert full.index.keys_of(POD) == lean.index.keys_of(POD) != set()
    assert full.root_checks() == lean.root_checks()
    assert lean.stats()["skipped"] == {}

    # ids that are no list are refused, naming the field; bad ids too where a request
    # starts (they are checked there), while a later store's are only counted, never used
    def decoded(token_ids, parent):
        ev = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": parent}
        payload = msgspec.msgpack.encode([0.0, [{**ev, "token_ids": token_ids, "block_size": 1}]])
        return decode_batch(payload, tokens=False).events[0]

    for token_ids, parent in (("x", 4), ("x", None), ([1.5], None), ([-1], None)):
        with pytest.raises(KVEventDecodeError, match="token_ids"):
            decoded(token_ids, parent)
    assert decoded([-1], 4).token_count == 1


def test_recorded_requests_predicted_as_vllm_cached_them(tokenizers):
    """Through the picker's KV cache: engine keys predict vLLM's cached_tokens exactly."""
    rows = _rows(SALTED / "requests.jsonl")
    messages = _rows(SALTED / "events.jsonl")
    translator, kv = picker(tokenizers)
    applied = hits = 0
    for row in rows:
        for m in messages[applied : row["messages_before"]]:
            translator.apply_events(
                POD, MODEL, decode_batch(base64.b64decode(m["payload_b64"])).events
            )
        applied = row["messages_before"]
        ctx = request(row["path"], row["body"])
        prompt = kv.prompt(ctx, ctx.request.body.cache_salt)
        assert prompt is not None
        cached = row["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert kv.cached_prefix(prompt, POD) == cached, row["body"].get("cache_salt")
        hits += cached > 0
    assert hits == 3 and translator.stats()["skipped"] == {}


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_simulator_seeded_alike_agrees(algo):
    """The simulator's hasher (its --seed standing for PYTHONHASHSEED) and the picker's give
    the same hashes for an unsalted prompt."""
    tokens = list(range(1000, 1000 + 32 * 5 + 7))
    sim = BlockHasher(32, algo, 7)
    digests: list[bytes] = []
    sim.extend(digests, tokens)
    engine = EngineKeys(EngineHashing(algo=algo, seed="7", block_size=32))
    assert engine.keys(tokens) == [event_hash(d) for d in digests]


def test_wrong_settings_are_logged_with_the_setting_named(caplog):
    engine = EngineKeys(EngineHashing(seed="1", block_size=32))
    translator = EngineKeyTranslator(KVBlockIndex(block_size=32), engine)
    first = _stores(SALTED)[2]  # unsalted, no parent
    with caplog.at_level(logging.WARNING, logger="kvindex.engine_translate"):
        translator.apply(POD, MODEL, first)
        translator.apply(POD, MODEL, first)  # once per pod and period
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "PYTHONHASHSEED '1'" in warnings[0] and POD in warnings[0]
    assert translator.root_checks()[POD] == (2, 2)
    # another engine block size: not indexed, and said
    caplog.clear()
    other = BlockStored(first.block_hashes[:1], None, first.token_ids[:16], 16)
    with caplog.at_level(logging.WARNING, logger="kvindex.engine_translate"):
        translator.apply("10.0.0.9:8000", MODEL, other)
    assert translator.stats()["skipped"] == {"block_size": 1}
    assert "block size 16" in caplog.records[0].getMessage()
    assert "--block-size 32" in caplog.records[0].getMessage()


def test_lora_keys_need_the_adapters_path(tokenizers):
    engine = EngineKeys(EngineHashing(block_size=32, lora_paths={"ad": "/adapters/ad"}))
    tokens = list(range(64))
    with_path = engine.keys(tokens, lora_name="ad")
    assert with_path != engine.keys(tokens) and len(with_path) == 2
    with pytest.raises(ValueError, match="no path configured"):
        engine.keys(tokens, lora_name="other")
    # the first block's extra keys as vLLM 0.32 tags them
    assert engine.extra_keys(0, "ad", "s") == (("lora", "ad", "/adapters/ad"), ("cache_salt", "s"))
    assert engine.extra_keys(1, "ad", "s") == (("lora", "ad", "/adapters/ad"),)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown prefix-caching hash algorithm"):
        EngineHashing(algo="md5")
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        EngineHashing(algo="xxhash")  # vLLM draws a random root per process
    with pytest.raises(ValueError, match="block size"):
        EngineHashing(block_size=0)
    with pytest.raises(ValueError, match="must be the engines'"):
        EngineKeyTranslator(KVBlockIndex(block_size=16), EngineKeys(RECORDED))
    with pytest.raises(ValueError, match="uint32"):
        EngineKeys(RECORDED).keys([2**32] * 32)


def test_hostile_events_do_no_harm():
    engine = EngineKeys(EngineHashing(block_size=4))
    index = KVBlockIndex(block_size=4)
    translator = EngineKeyTranslator(index, engine)
    tokens = tuple(range(8))
    keys = engine.keys(tokens)
    good = BlockStored(tuple(keys), None, tokens, 4)
    assert translator.apply_events(POD, MODEL, [good]) == 0
    # removals of hashes never stored, the table's reserved keys, a repeat: nothing breaks
    removals = [BlockRemoved((12345, 0, 1)), BlockRemoved((12345,)), BlockRemoved((2**64 - 1,))]
    assert translator.apply_events(POD, MODEL, removals) == 0
    assert index.match_lengths(keys, [POD]) == {POD: 2}
    # stores naming reserved or repeated hashes, a wrong token count, another medium
    odd = [
        BlockStored((0, 1), keys[-1], tuple(range(8, 16)), 4),
        BlockStored((7, 7), None, tuple(range(8)), 4),
        BlockStored((9,), None, tuple(range(3)), 4),
        BlockStored((10,), None, tuple(range(4)), 4, medium="disk"),
    ]
    assert translator.apply_events(POD, MODEL, odd) == 0
    assert translator.stats()["skipped"] == {"token_count": 1, "medium": 1}
    assert index.match_lengths(keys, [POD]) == {POD: 2}
    # a digest instead of an int is cut to its low 64 bits; a hash past uint64 is refused
    wire = {"type": "BlockRemoved", "block_hashes": [(keys[1]).to_bytes(32, "big")]}
    ev = decode_batch(msgspec.msgpack.encode([0.0, [wire], 0])).events[0]
    translator.apply(POD, MODEL, ev)
    assert index.match_lengths(keys, [POD]) == {POD: 1}
    with pytest.raises(KVEventDecodeError, match="block_hashes"):
        decode_batch(msgspec.msgpack.encode([0.0, [{**wire, "block_hashes": ["x"]}], 0]))
    translator.apply_events(POD, MODEL, [BlockRemoved(tuple(keys))])
    assert index.match_lengths(keys, [POD]) == {POD: 0}


def test_real_zmq_publisher_feeds_the_engine_keyed_index():
    """The recorded salted vLLM messages over a real PUB → SUB: the picker's keys for each
    recorded prompt are held by the pod afterwards."""
    rows = _rows(SALTED / "requests.jsonl")
    messages = _rows(SALTED / "events.jsonl")
    engine = EngineKeys(RECORDED)
    index = KVBlockIndex(block_size=32)
    translator = EngineKeyTranslator(index, engine)

    async def run() -> None:
        port = free_port()
        sub = KVEventSubscriber(translator, decode_tokens=False)
        sub.bind(f"tcp://127.0.0.1:{port}")
        ctx = zmq.Context()
        pub = sourced_pub(ctx, "127.0.0.1", port)
        try:
            await wait_heard(sub, pub)
            for m in messages:
                topic = b"kv@127.0.0.1:8300@tiny"
                pub.send_multipart(
                    [topic, m["seq"].to_bytes(8, "big"), base64.b64decode(m["payload_b64"])]
                )
            await until(lambda: translator.stats()["events"].get("BlockStored", 0) == 3, "stores")
        finally:
            pub.close(0)
            ctx.term()
            await sub.close()

    asyncio.run(run())
    for row in rows[:3]:
        keys = engine.keys(row["tokenize"]["tokens"], cache_salt=row["body"].get("cache_salt"))
        assert index.match_lengths(keys, [POD]) == {POD: len(keys)}
    assert translator.root_checks()[POD] == (3, 0)


def test_the_simulator_hashes_as_the_picker_does(sim_factory, subscriber, tokenizers):
    """A simulator started with --seed 5 --prefix-caching-hash-algo sha256_cbor (a vLLM with
    PYTHONHASHSEED=5) over real ZMQ: the picker, told the same, predicts its cached tokens
    for salted and unsalted repeats, and every first block checks out."""
    url, _ = start_tiny(
        sim_factory,
        subscriber,
        "--seed",
        "5",
        "--prefix-caching-hash-algo",
        "sha256_cbor",
        blocks=200,
    )
    translator, kv = picker(tokenizers, EngineHashing("sha256_cbor", "5", 32))
    base = _rows(SALTED / "requests.jsonl")[0]
    applied = 0

    def send(salt):
        nonlocal applied
        messages = subscriber.drain()
        for msg in messages[applied:]:
            translator.apply_events(POD, MODEL, msg.batch.events)
        applied = len(messages)
        body = {k: v for k, v in base["body"].items() if k != "cache_salt"}
        body["max_tokens"] = 2
        if salt is not None:
            body["cache_salt"] = salt
        ctx = request(base["path"], body)
        prompt = kv.prompt(ctx, ctx.request.body.cache_salt)
        want = kv.cached_prefix(prompt, POD)
        r = requests.post(url + base["path"], json=body, timeout=30)
        assert r.status_code == 200, r.text
        return want, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    n = len(base["tokenize"]["tokens"])
    hit = (n - 1) // 32 * 32
    assert send("tenant-a") == (0, 0)
    assert send(None) == (0, 0)  # another salt (none): nothing shared
    assert send("tenant-a") == (hit, hit)
    assert send(None) == (hit, hit)
    send(None)  # the events so far are in: each first-time prompt's store checked out
    assert translator.root_checks()[POD] == (2, 0)


def test_kept_digests_are_bounded_and_change_nothing(monkeypatch):
    from infergw.kvindex import engine_hashing

    monkeypatch.setattr(engine_hashing, "CACHE_BLOCKS", 8)
    tokens = list(range(32 * 20))
    want = EngineKeys(RECORDED).keys(tokens)
    engine = EngineKeys(RECORDED)
    for _ in range(3):
        assert engine.keys(tokens) == want
        assert engine.keys(tokens, cache_salt="s") != want
        assert len(engine._cache) <= 8
