"""bench/routing's production-shaped workloads: each trace repeats exactly for its seed, the
skews they claim are there when counted on a trace, bursts are bursty, and every prompt
fits the simulator fleet the benchmark runs."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from infergw.bench.routing.agentic import Agentic
from infergw.bench.routing.arrivals import OnOff, Poisson, gap_cv
from infergw.bench.routing.catalog import plan, with_arrivals
from infergw.bench.routing.mixed import Mixed
from infergw.bench.routing.rag import Rag, chunks_of
from infergw.bench.routing.tenants import Tenants
from infergw.bench.routing.workloads import NoReuse, SharedPrefix

NEW = ("tenants", "agentic", "rag", "bursty", "mixed")


def _workloads(pods: int = 2) -> list:
    """Every workload the benchmark runs, Poisson and bursty."""
    base = [wl for wl, _ in plan(False, pods)]
    return base + [with_arrivals(wl, "bursty") for wl in base if wl.name != "bursty"]


def test_the_catalog_names_every_new_workload_and_quick_keeps_one_rate_each():
    names = [wl.name for wl, _ in plan(False, 2)]
    assert set(NEW) <= set(names) and len(set(names)) == len(names)
    assert all(len(rates) == 1 for _, rates in plan(True, 2))


@pytest.mark.parametrize("wl", _workloads(), ids=lambda wl: wl.name)
def test_a_trace_depends_only_on_the_seed(wl):
    a, b = wl.trace(6.0, 20.0, seed=1), wl.trace(6.0, 20.0, seed=1)
    assert a == b and a
    assert wl.trace(6.0, 20.0, seed=2) != a
    assert all(x.at <= y.at for x, y in itertools.pairwise(a))
    assert all(0 <= x.at < 20.0 for x in a)
    described = wl.describe()
    assert described["name"] == wl.name and len(described) > 2


def test_tenant_popularity_follows_zipf():
    """The most popular tenant sends clearly more than the least; with s = 0 they are even."""

    def counts(s: float) -> list[int]:
        wl = Tenants(tenants=10, zipf_s=s, min_system_words=5, max_system_words=10)
        seen = Counter(
            wl.systems.index(a.body["messages"][0]["content"])
            for a in wl.trace(20.0, 100.0, seed=3)
        )
        return [seen[i] for i in range(10)]

    skewed = counts(1.1)  # expected ratio 10^1.1 ≈ 12.6 between the first and the tenth
    assert skewed[0] > 6 * skewed[9]
    assert skewed[0] > 0.3 * sum(skewed)
    flat = counts(0.0)
    assert max(flat) < 1.5 * min(flat)


def test_tenants_system_prompts_differ_in_length_and_questions_are_short():
    wl = Tenants(tenants=20)
    lengths = [len(s.split()) for s in wl.systems]
    assert max(lengths) > 2 * min(lengths)
    for a in wl.trace(10.0, 5.0, seed=1):
        system, user = a.body["messages"]
        assert system["content"] in wl.systems
        assert len(user["content"].split()) == wl.question_words


def test_rag_prompts_share_chunks_in_different_orders():
    wl = Rag(chunks=30, k=4, chunk_words=5)
    prompts = [chunks_of(a.body["prompt"]) for a in wl.trace(20.0, 20.0, seed=4)]
    assert all(len(p) == len(set(p)) == 4 for p in prompts)
    pairs = list(itertools.combinations(prompts, 2))
    sharing = [(p, q) for p, q in pairs if set(p) & set(q)]
    assert len(sharing) > len(pairs) / 2  # popular chunks recur
    # The same chunks, another order: the common prefix ends at the first differing chunk.
    reordered = [
        (p, q)
        for p, q in sharing
        if len(set(p) & set(q)) >= 2 and [c for c in p if c in q] != [c for c in q if c in p]
    ]
    assert reordered
    partial = [(p, q) for p, q in pairs if p[0] == q[0] and p != q]
    assert partial  # a shared first chunk, then a different one
    uses = Counter(c for p in prompts for c in p)
    assert uses[0] > 3 * uses[29]


def test_agentic_turns_extend_the_history_with_a_call_and_a_tool_output():
    wl = Agentic(turns=4, tool_s=0.1, min_tool_words=20, max_tool_words=200)
    sessions: dict[str, list[list[dict]]] = {}
    for a in wl.trace(8.0, 30.0, seed=5):
        sessions.setdefault(a.body["messages"][0]["content"], []).append(a.body["messages"])
    complete = [turns for turns in sessions.values() if len(turns) == 4]
    assert complete
    tool_lengths = set()
    for turns in complete:
        for earlier, later in itertools.pairwise(turns):
            assert later[: len(earlier)] == earlier
            call, tool = later[len(earlier) :]
            assert call["role"] == "assistant" and tool["role"] == "tool"
            assert call["content"].startswith(tool["tool_call_id"])
            tool_lengths.add(len(tool["content"].split()))
    assert len(tool_lengths) > 3 and min(tool_lengths) >= 20 and max(tool_lengths) <= 200


def test_bursty_gaps_vary_more_than_poisson_at_the_same_mean_rate():
    bursty = OnOff().times(random.Random(6), 10.0, 600.0)
    poisson = Poisson().times(random.Random(6), 10.0, 600.0)
    assert gap_cv(bursty) > 2
    assert 0.9 < gap_cv(poisson) < 1.1
    assert len(bursty) == pytest.approx(6000, rel=0.05)
    # Even a trace as short as a benchmark point keeps its asked mean rate.
    for seed in range(10):
        assert len(OnOff().times(random.Random(seed), 12.0, 23.0)) == pytest.approx(276, rel=0.2)


def test_the_bursty_option_makes_any_workload_bursty_under_another_name():
    shared = SharedPrefix(groups=4, users=2, prefix_words=20)
    bursty = with_arrivals(shared, "bursty")
    assert bursty.name == "shared-prefix+bursty" and bursty.prefixes == shared.prefixes
    assert gap_cv([a.at for a in bursty.trace(10.0, 300.0, seed=1)]) > 2
    assert with_arrivals(shared, "poisson") is shared
    mixed = with_arrivals(Mixed(shared, NoReuse(20)), "bursty")
    assert isinstance(mixed.reusable.arrivals, OnOff) and isinstance(mixed.no_reuse.arrivals, OnOff)


def test_mixed_sends_the_asked_share_of_requests_that_reuse_nothing():
    shared = SharedPrefix(groups=3, users=2, prefix_words=20)
    trace = Mixed(shared, NoReuse(20), fraction=0.3).trace(20.0, 100.0, seed=7)
    reusing = sum(a.body["prompt"].startswith("Group ") for a in trace)
    assert (len(trace) - reusing) / len(trace) == pytest.approx(0.3, abs=0.05)
    only = Mixed(shared, NoReuse(20), fraction=0.0).trace(20.0, 10.0, seed=7)
    assert all(a.body["prompt"].startswith("Group ") for a in only)


def test_every_request_fits_the_benchmark_pods_context():
    """The simulator lowers its 4,096-token max_model_len to what 320 blocks hold (more):
    a prompt and its answer must stay within 4,096 tokens or the pod rejects it."""
    from infergw.kvindex.tokenize import PromptTokenizer
    from infergw.stack.local import DEFAULT_MODEL_DIR

    tok = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    for wl, rates in plan(False, 8):
        for a in wl.trace(max(rates), 23.0, seed=7):
            assert len(tok.tokens_for(a.api, a.body)) + a.body["max_tokens"] <= 4096, wl.name
