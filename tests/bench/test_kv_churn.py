"""bench/kv_churn: the generated stream is what vLLM sends and the picker takes all of it."""

from __future__ import annotations

from infergw.bench import kv_churn
from infergw.kvindex.events import BlockRemoved, BlockStored, decode_message


def test_each_request_stores_its_new_blocks_and_evicts_one_event_a_block():
    messages = kv_churn.churn(requests=200, pods=2, capacity=100, groups=4, seed=1)
    held: dict[str, set[int]] = {}
    for pod, frames in messages:
        events = decode_message(frames).batch.events
        stored, *removed = events
        assert isinstance(stored, BlockStored)
        assert all(isinstance(e, BlockRemoved) and len(e.block_hashes) == 1 for e in removed)
        cache = held.setdefault(pod, set())
        cache.update(stored.block_hashes)
        for e in removed:
            cache.discard(e.block_hashes[0])
        assert len(cache) <= 100  # the LRU keeps each pod's cache at its capacity


def test_it_times_the_installed_code(capsys):
    assert kv_churn.main(["--requests", "50", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| HEAD |" in out and "KV events a request" in out
