"""prefix-cache-scorer: approximate prefix affinity from where earlier prompts were sent."""

from __future__ import annotations

import xxhash

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.metrics import PickerMetrics
from infergw.epp.request_body import RequestBody
from infergw.epp.scheduling.framework import ProfileResult, SchedulingResult
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.plugins.prefix_cache import PrefixCacheScorer
from tests.request_fixtures import bare_context

A, B, C = (
    Endpoint(name=f"{p}-rank-0", pod=p, address=f"10.0.0.{i}:8000")
    for i, p in enumerate("abc", start=1)
)
ALL = [A, B, C]


def req(prompt: str, model: str = "m", cache_salt: str | None = None) -> RequestContext:
    return bare_context(model=model, body=RequestBody(cache_salt=cache_salt), prompt_text=prompt)


def scorer(**params) -> PrefixCacheScorer:
    # One token a block: 4 characters, so prompts stay readable.
    return PrefixCacheScorer("prefix", {"blockSizeTokens": 1, **params})


def send(s: PrefixCacheScorer, prompt: str, *targets: Endpoint, model: str = "m") -> None:
    """What the director does after scheduling: pre_request with the chosen endpoints."""
    r = req(prompt, model)
    s.pre_request(r, SchedulingResult({"p": ProfileResult(list(targets))}, "p"))


def scores(s: PrefixCacheScorer, prompt: str, model: str = "m", **body) -> list[float]:
    return s.score(req(prompt, model, **body), ALL)


# ---- hashing ------------------------------------------------------------------------------


def test_blocks_are_block_size_tokens_times_four_characters():
    assert len(PrefixCacheScorer("p").hashes(req("x" * 64))) == 1  # default 16 tokens
    assert len(PrefixCacheScorer("p").hashes(req("x" * 65))) == 2
    assert len(scorer().hashes(req("abcdefgh"))) == 2


def test_a_trailing_partial_block_counts():
    assert len(scorer().hashes(req("abcdefghi"))) == 3


def test_empty_prompt_has_no_blocks_and_scores_zero():
    s = scorer()
    assert s.hashes(req("")) == []
    send(s, "", A)
    assert scores(s, "") == [0.0, 0.0, 0.0]


def test_hashes_chain_xxh64_seeded_with_the_model():
    prev = xxhash.xxh64_intdigest(b"m")
    expected = []
    for block in (b"abcd", b"efgh"):
        prev = xxhash.xxh64_intdigest(block + prev.to_bytes(8, "little"))
        expected.append(prev)
    assert scorer().hashes(req("abcdefgh")) == expected


def test_max_prefix_blocks_caps_the_hashes():
    assert len(scorer(maxPrefixBlocksToMatch=3).hashes(req("x" * 400))) == 3


def test_block_hash_depends_on_everything_before_it():
    s = scorer()
    one = s.hashes(req("aaaabbbb"))
    two = s.hashes(req("zzzzbbbb"))
    assert one[0] != two[0]
    assert one[1] != two[1]  # same block text, different prefix


def test_hashes_are_computed_once_per_request():
    s = scorer()
    r = req("abcdefgh")
    assert s.hashes(r) is s.hashes(r)


# ---- scoring ------------------------------------------------------------------------------


def test_nothing_recorded_scores_zero():
    assert scores(scorer(), "abcdefgh") == [0.0, 0.0, 0.0]


def test_same_prompt_scores_one_on_the_pod_it_went_to():
    s = scorer()
    send(s, "abcdefghijkl", B)
    assert scores(s, "abcdefghijkl") == [0.0, 1.0, 0.0]


def test_shared_prefix_scores_the_matched_fraction():
    s = scorer()
    send(s, "aaaabbbbcccc", A)
    assert scores(s, "aaaabbbbxxxxyyyy") == [0.5, 0.0, 0.0]  # 2 of 4 blocks
    assert scores(s, "aaaabbbbccccdddd") == [0.75, 0.0, 0.0]


def test_trailing_partial_block_must_match_exactly():
    # "aaaa" matches; the partial block "b" was never sent ("bbbb" was).
    s = scorer()
    send(s, "aaaabbbb", A)
    assert scores(s, "aaaab") == [0.5, 0.0, 0.0]


def test_each_pod_scores_its_own_longest_prefix():
    s = scorer()
    send(s, "aaaabbbb", A)
    send(s, "aaaabbbbccccdddd", B)
    assert scores(s, "aaaabbbbccccdddd") == [0.5, 1.0, 0.0]


def test_a_different_first_block_matches_nothing():
    s = scorer()
    send(s, "aaaabbbbcccc", A)
    assert scores(s, "zzzzbbbbcccc") == [0.0, 0.0, 0.0]


def test_lookup_is_greedy_and_stops_at_the_first_miss():
    # Capacity 3: sending a 1-block prompt after a 3-block one evicts block 0 of the first.
    s = scorer(lruCapacityPerServer=3)
    send(s, "aaaabbbbcccc", A)
    send(s, "zzzz", A)
    assert scores(s, "aaaabbbbcccc") == [0.0, 0.0, 0.0]  # blocks 1, 2 are still held


def test_only_the_primary_target_is_recorded():
    s = scorer()
    send(s, "abcdefgh", A, B, C)
    assert scores(s, "abcdefgh") == [1.0, 0.0, 0.0]


def test_scores_only_for_the_endpoints_asked_about():
    s = scorer()
    send(s, "abcdefgh", A)
    assert s.score(req("abcdefgh"), [C, A]) == [0.0, 1.0]
    assert s.score(req("abcdefgh"), []) == []


def test_another_model_gets_no_hits():
    s = scorer()
    send(s, "abcdefgh", A, model="llama")
    assert scores(s, "abcdefgh", model="llama") == [1.0, 0.0, 0.0]
    assert scores(s, "abcdefgh", model="qwen") == [0.0, 0.0, 0.0]


def test_cache_salt_separates_prefixes():
    s = scorer()
    r = req("abcdefgh", cache_salt="tenant-a")
    s.pre_request(r, SchedulingResult({"p": ProfileResult([A])}, "p"))
    assert scores(s, "abcdefgh", cache_salt="tenant-a") == [1.0, 0.0, 0.0]
    assert scores(s, "abcdefgh", cache_salt="tenant-b") == [0.0, 0.0, 0.0]
    assert scores(s, "abcdefgh") == [0.0, 0.0, 0.0]


def test_pre_request_without_targets_records_nothing():
    s = scorer()
    r = req("abcdefgh")
    s.pre_request(r, SchedulingResult({"p": ProfileResult([])}, "p"))
    assert scores(s, "abcdefgh") == [0.0, 0.0, 0.0]


# ---- LRU ----------------------------------------------------------------------------------


def test_lru_capacity_evicts_the_least_recently_used():
    s = scorer(lruCapacityPerServer=2)
    send(s, "1111", A)
    send(s, "2222", A)
    send(s, "1111", A)  # refreshes 1111
    send(s, "3333", A)  # evicts 2222
    assert scores(s, "1111")[0] == 1.0
    assert scores(s, "2222")[0] == 0.0
    assert scores(s, "3333")[0] == 1.0


def test_capacity_is_per_server():
    s = scorer(lruCapacityPerServer=1)
    send(s, "1111", A)
    send(s, "2222", B)
    send(s, "3333", A)  # evicts 1111 from A only
    assert scores(s, "1111") == [0.0, 0.0, 0.0]
    assert scores(s, "2222") == [0.0, 1.0, 0.0]


def test_eviction_from_one_server_keeps_the_others_copy():
    s = scorer(lruCapacityPerServer=1)
    send(s, "1111", A)
    send(s, "1111", B)
    send(s, "2222", A)
    assert scores(s, "1111") == [0.0, 1.0, 0.0]


def test_a_long_prompt_fills_the_lru_to_capacity():
    s = scorer(lruCapacityPerServer=5)
    send(s, "x" * 4 * 20, A)
    assert len(s._by_server[A.address]) == 5


# ---- forget_server ------------------------------------------------------------------------


def test_forget_server_drops_what_it_held():
    s = scorer()
    send(s, "abcdefgh", A)
    send(s, "abcdefgh", B)
    s.forget_server(A.address)
    assert scores(s, "abcdefgh") == [0.0, 1.0, 0.0]
    s.forget_server(B.address)
    assert scores(s, "abcdefgh") == [0.0, 0.0, 0.0]
    assert s._servers_of == {}


def test_forget_an_unknown_server_is_harmless():
    s = scorer()
    send(s, "abcd", A)
    s.forget_server("10.9.9.9:8000")
    assert scores(s, "abcd") == [1.0, 0.0, 0.0]


def test_a_forgotten_server_can_learn_again():
    s = scorer()
    send(s, "abcd", A)
    s.forget_server(A.address)
    send(s, "abcd", A)
    assert scores(s, "abcd") == [1.0, 0.0, 0.0]


# ---- several instances --------------------------------------------------------------------


def test_instances_do_not_share_their_index():
    one, two = scorer(), scorer()
    send(one, "abcd", A)
    assert scores(two, "abcd") == [0.0, 0.0, 0.0]


def test_instances_with_different_block_sizes_hash_the_same_request_their_own_way():
    small, large = scorer(), PrefixCacheScorer("large", {"blockSizeTokens": 4})
    r = req("x" * 64)
    assert len(small.hashes(r)) == 16
    assert len(large.hashes(r)) == 4


# ---- the reference's prefix-indexer metrics -------------------------------------------------


def test_lookups_record_the_best_match_and_the_index_its_size():
    metrics = PickerMetrics()
    s = PrefixCacheScorer.create("prefix", {"blockSizeTokens": 1}, Handle(metrics=metrics))
    send(s, "abcdefgh", A)  # two blocks on A
    send(s, "abcdwxyz", B)  # the first block on B too, and another

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    assert value("inference_extension_prefix_indexer_size") == 4
    scores(s, "abcdefghijkl")  # three blocks: A holds two of them
    assert value("inference_extension_prefix_indexer_hit_ratio_sum") == 2 / 3
    assert value("inference_extension_prefix_indexer_hit_bytes_sum") == 8
    s.forget_server(A.address)
    assert value("inference_extension_prefix_indexer_size") == 2
