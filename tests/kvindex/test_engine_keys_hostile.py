"""Engine keys against a hostile or misconfigured engine, over real ZMQ into the central
subscriber: floods of clears cost a bounded number of passes over the index, and every fault
is counted and logged once per (pod, kind) per interval, naming the pod."""

from __future__ import annotations

import logging

import msgspec
import pytest

from infergw.kvindex.engine_hashing import EngineHashing, EngineKeys
from infergw.kvindex.engine_translate import CLEAR_EVERY, ROOT_MISMATCH, EngineKeyTranslator
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.kvindex.unresolved import LOG_EVERY
from tests.kv_wire import central_pubs, until

BS = 4
POD, OTHER = "127.0.0.2:8000", "127.0.0.3:8000"  # each publishes from its own address
PICKER = EngineHashing(algo="sha256", seed="1", block_size=BS)
ENGINE_ELSEWHERE = EngineHashing(algo="sha256", seed="2", block_size=BS)  # another seed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingIndex(KVBlockIndex):
    """The real index; it counts its passes clearing a pod."""

    clears = 0

    def clear_pod(self, pod, keys=()):
        self.clears += 1
        super().clear_pod(pod, keys)


def stored(hashing: EngineHashing, tokens: list[int], parent: int | None = None) -> dict:
    keys = EngineKeys(hashing).keys(tokens)
    return {
        "type": "BlockStored",
        "block_hashes": keys,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
    }


CLEARED = {"type": "AllBlocksCleared"}


@pytest.fixture
async def wire():
    clock = Clock()
    index = CountingIndex(block_size=BS, max_entries=100_000)
    translator = EngineKeyTranslator(index, EngineKeys(PICKER), clock=clock)
    sub = KVEventSubscriber(translator, is_member={POD, OTHER}.__contains__, decode_tokens=False)
    async with central_pubs(sub, {POD: "127.0.0.2", OTHER: "127.0.0.3"}) as pubs:
        seqs = {POD: 0, OTHER: 0}

        def send(pod: str, events: list) -> None:
            payload = msgspec.msgpack.encode([0.0, events, 0])
            pubs[pod].send_multipart(
                [f"kv@{pod}@m".encode(), seqs[pod].to_bytes(8, "big"), payload]
            )
            seqs[pod] += 1

        send.pubs = pubs  # the sockets, for frames of a test's own
        yield send, sub, translator, index, clock


async def test_a_storm_of_clears_costs_one_pass_per_period(wire):
    """One message of 500 [store, clear] pairs was 500 passes over the whole index (6 s of
    CPU over 1.6 M entries): now the first clear runs, the rest wait for the period's end,
    and what was stored meanwhile goes then."""
    send, _sub, translator, index, clock = wire
    first = stored(PICKER, list(range(8)))
    send(OTHER, [stored(PICKER, list(range(100, 108)))])
    send(POD, [first])
    await until(lambda: index.match_lengths(first["block_hashes"], [POD]) == {POD: 2}, "stored")
    storm = []
    for i in range(500):
        storm += [stored(PICKER, list(range(1000 + 4 * i, 1004 + 4 * i))), CLEARED]
    last = stored(PICKER, list(range(50, 58)))
    send(POD, [*storm, last])
    await until(lambda: translator.stats()["events"].get("AllBlocksCleared") == 500, "storm")
    assert index.clears == 1
    assert index.match_lengths(first["block_hashes"], [POD]) == {POD: 0}  # the first clear
    assert index.match_lengths(last["block_hashes"], [POD]) == {POD: 2}  # waits
    assert translator.faults.counts()[POD]["clears_deferred"] == 499
    # The period ends; the next batch (any pod's) runs the clear that waited.
    clock.now += CLEAR_EVERY
    other = stored(PICKER, list(range(200, 208)))
    send(OTHER, [other])
    await until(lambda: index.match_lengths(other["block_hashes"], [OTHER]) == {OTHER: 2}, "b")
    assert index.clears == 2
    assert index.match_lengths(last["block_hashes"], [POD]) == {POD: 0}
    # The other pod's entries were never touched, and the pod indexes again.
    assert index.match_lengths(EngineKeys(PICKER).keys(list(range(100, 108))), [OTHER]) == {
        OTHER: 2
    }
    send(POD, [last])
    await until(lambda: index.match_lengths(last["block_hashes"], [POD]) == {POD: 2}, "again")


async def test_each_fault_is_logged_once_per_pod_and_kind_per_interval(wire, caplog):
    """An engine hashing otherwise floods mismatching stores, stores whose token counts do
    not fill their blocks, another medium, and a malformed message (a LoRA name that is not
    a string): each kind is one line naming the pod, counted in full; another pod's first
    fault of a kind is logged despite the flood; the same pod's good stores still index."""
    send, sub, translator, index, clock = wire
    good = stored(PICKER, list(range(8)))
    bad_lora = {**stored(PICKER, list(range(8))), "lora_name": 7}
    with caplog.at_level(logging.INFO):
        for i in range(100):
            tokens = list(range(10 * i, 10 * i + 8))
            send(POD, [
                stored(ENGINE_ELSEWHERE, tokens),
                {**stored(PICKER, tokens), "token_ids": tokens[:5]},
                {**stored(PICKER, tokens), "medium": "DISK\n injected line"},
            ])  # fmt: skip
            send(POD, [bad_lora])
        send(OTHER, [stored(ENGINE_ELSEWHERE, list(range(8)))])
        send(POD, [good])
        await until(lambda: index.match_lengths(good["block_hashes"], [POD]) == {POD: 2}, "good")
        await until(lambda: OTHER in translator.root_checks(), "the other pod's store")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    def about(pod: str, kind: str) -> list[str]:
        return [m for m in lines if m.startswith(f"KV events of {pod}:") and f"({kind};" in m]

    for kind in (ROOT_MISMATCH, "token_count", "medium", "malformed"):
        assert len(about(POD, kind)) == 1, (kind, lines)
    assert len(about(OTHER, ROOT_MISMATCH)) == 1
    assert "PYTHONHASHSEED '1'" in about(POD, ROOT_MISMATCH)[0]
    assert "5 token ids" in about(POD, "token_count")[0]
    assert "lora_name must be a string" in about(POD, "malformed")[0]
    assert "\n" not in about(POD, "medium")[0]  # the engine's string is quoted, not echoed
    counts = translator.faults.counts()
    assert counts[POD] == {ROOT_MISMATCH: 100, "token_count": 100, "medium": 100}
    assert sub.faults.counts()[POD] == {"malformed": 100}
    # After the interval, one more line each, saying how many came meanwhile.
    caplog.clear()
    clock.now += LOG_EVERY
    with caplog.at_level(logging.WARNING):
        send(POD, [stored(ENGINE_ELSEWHERE, list(range(900, 908)))])
        await until(lambda: translator.faults.counts()[POD][ROOT_MISMATCH] == 101, "logged")
    [line] = [r.getMessage() for r in caplog.records]
    assert "(root_mismatch; 100 such since the last line about it, 101 in all" in line


def test_token_keys_clears_are_paced_alike():
    """The default mode (token-id keys, kvindex.translate) passes over the packed index per
    clear the same way, and is paced the same way."""
    from infergw.kvindex.events import AllBlocksCleared, BlockStored
    from infergw.kvindex.translate import EventTranslator

    clock = Clock()
    index = CountingIndex(block_size=BS)
    sink = EventTranslator(index, clock=clock)
    storm = []
    for i in range(500):
        storm += [
            BlockStored((i + 1,), None, tuple(range(4 * i, 4 * i + 4)), BS),
            AllBlocksCleared(),
        ]
    last = BlockStored((9999,), None, (7, 7, 7, 7), BS)
    assert sink.apply_events(POD, "m", [*storm, last]) == 0
    assert index.clears == 1 and index.stats()["entries"] == 500  # 499 and `last` wait
    assert sink.faults.counts()[POD] == {"clears_deferred": 499}
    clock.now += CLEAR_EVERY
    sink.apply_events(OTHER, "m", [])
    assert index.clears == 2 and index.stats()["entries"] == 0


async def test_an_outsiders_batches_are_refused_before_they_are_decoded(wire):
    """A member's topic from another address, or a topic naming no pod of the pool, is
    refused from the topic frame: its payload (here not msgpack at all, 1 MiB) is never read,
    so the drop says whose it claims to be, not what is wrong inside."""
    send, sub, _translator, _index, _clock = wire
    sub.dropped.clear()
    junk = b"\xc1" * (1 << 20)
    topics = (f"kv@{POD}@m".encode(), b"kv@10.1.2.3:8000@m")
    for topic in topics:  # from OTHER's socket (127.0.0.3): neither is its own
        send.pubs[OTHER].send_multipart([topic, (0).to_bytes(8, "big"), junk])
    await until(lambda: sum(sub.dropped.values()) == 2, "both dropped")
    assert sub.dropped == {"peer_mismatch": 1, "unknown_pod": 1}
