"""The continuous-batching engine, in process: batching limits, prefix hits, preemption, LoRA."""

from __future__ import annotations

import asyncio
import random

import pytest

from infergw.simulator.block_hashing import BlockHasher
from infergw.simulator.block_pool import BlockPool
from infergw.simulator.config import LatencyModel
from infergw.simulator.engine import Engine, EngineLimits
from infergw.simulator.request import SamplingParams, SimRequest, Status

BS = 16
TEXTS = {i: f" t{i}" for i in range(100, 200)}


def engine(num_blocks=200, max_num_seqs=8, budget=512, max_loras=1, latency=None) -> Engine:
    return Engine(
        pool=BlockPool(num_blocks, BS),
        hasher=BlockHasher(BS, "sha256", 0),
        limits=EngineLimits(max_num_seqs, budget, 4096, max_loras),
        latency=latency or LatencyModel(time_scale=0.0),
        token_texts=TEXTS,
    )


def request(prompt, max_tokens=4, lora=None, seed=0, **params) -> SimRequest:
    return SimRequest(
        request_id=f"r{random.random()}",
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, **params),
        rng=random.Random(seed),
        lora_id=1 if lora else None,
        lora_name=lora,
    )


async def drain(req: SimRequest) -> list:
    outs = []
    while True:
        out = await req.outputs.get()
        outs.append(out)
        if out.finish_reason:
            return outs


@pytest.fixture
async def running_engine():
    engines = []

    def make(**kw):
        e = engine(**kw)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        await e.stop()


async def test_generates_max_tokens_then_frees_blocks(running_engine):
    e = running_engine()
    r = request(range(40), max_tokens=5)
    e.add_request(r)
    outs = await drain(r)
    assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
    assert len(r.output_token_ids) == 5 and r.status is Status.FINISHED
    assert r.output_text == "".join(o.text for o in outs)
    assert e.pool.num_free == e.pool.num_usable
    assert e.stats.prompt_tokens == 40 and e.stats.generation_tokens == 5


async def test_repeated_prompt_hits_the_prefix_cache(running_engine):
    e = running_engine()
    first = request(range(100))
    e.add_request(first)
    await drain(first)
    again = request(range(100))
    e.add_request(again)
    await drain(again)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (100 - 1) // BS * BS
    assert e.stats.prefix_cache_hits == again.num_cached_tokens
    assert e.stats.prefix_cache_queries == 200


async def test_same_seed_same_output(running_engine):
    e = running_engine()
    a, b, c = request(range(30), seed=7), request(range(30), seed=7), request(range(30), seed=8)
    for r in (a, b, c):
        e.add_request(r)
    await asyncio.gather(drain(a), drain(b), drain(c))
    assert a.output_token_ids == b.output_token_ids != c.output_token_ids


def test_scheduler_respects_max_num_seqs_and_token_budget():
    e = engine(max_num_seqs=3, budget=100)
    reqs = [request(range(i * 1000, i * 1000 + 40)) for i in range(5)]
    for r in reqs:
        e.add_request(r)
    step = e._schedule()
    # budget 100: 40 + 40 + 20 (the third prompt is chunked), and never more than 3 running
    assert [n for _, n in step.scheduled] == [40, 40, 20]
    assert len(e.running) == 3 and len(e.waiting) == 2
    assert step.prefill_tokens == 100 and step.decode_seqs == 0


def test_decode_step_time_grows_with_the_batch():
    lat = LatencyModel(
        prefill_s_per_token=0,
        decode_s_per_step=0.008,
        decode_s_per_seq=0.001,
        step_overhead_s=0.001,
    )
    assert lat.step_seconds(0, 1) == pytest.approx(0.010)
    assert lat.step_seconds(0, 32) == pytest.approx(0.041)
    assert lat.step_seconds(1000, 0) == pytest.approx(0.001)


async def test_preemption_when_blocks_run_out(running_engine):
    # 9 usable blocks; 3 requests of 2 prompt blocks each grow by 48 tokens (3 blocks) each.
    e = running_engine(num_blocks=10)
    reqs = [request(range(i * 100, i * 100 + 32), max_tokens=48, seed=i) for i in range(3)]
    for r in reqs:
        e.add_request(r)
    await asyncio.wait_for(asyncio.gather(*(drain(r) for r in reqs)), 10)
    assert e.stats.preemptions > 0
    assert all(len(r.output_token_ids) == 48 for r in reqs)
    assert e.pool.num_free == e.pool.num_usable


async def test_one_lora_slot_serialises_two_adapters(running_engine):
    e = running_engine(max_loras=1)
    a = request(range(20), max_tokens=3, lora="a")
    b = request(range(20), max_tokens=3, lora="b")
    e.add_request(a)
    e.add_request(b)
    step = e._schedule()
    assert [r for r, _ in step.scheduled] == [a]
    assert e.lora_adapters() == ({"a"}, {"b"})
    e.running.clear()  # hand back to the loop cleanly
    e.waiting.clear()


async def test_waiting_requests_are_split_by_reason(running_engine):
    """vllm:num_requests_waiting_by_reason: passed over for a LoRA slot is 'deferred', not
    reached for want of a sequence slot is 'capacity'; the two sum to num_waiting."""
    e = running_engine(max_num_seqs=2, max_loras=1)
    a, b = request(range(20), lora="a"), request(range(20), lora="b")
    c, d = request(range(30)), request(range(40))
    for r in (a, b, c, d):
        e.add_request(r)
    step = e._schedule()
    assert [r for r, _ in step.scheduled] == [a, c]
    assert e.waiting_by_reason() == {"capacity": 1, "deferred": 1} and e.num_waiting == 2
    e.running.clear()  # hand back to the loop cleanly
    e.waiting.clear()
    assert e.waiting_by_reason() == {"capacity": 0, "deferred": 0}


async def test_cache_writes_hits_and_prefill_work_are_counted(running_engine):
    e = running_engine()
    first, again = request(range(40), max_tokens=2), request(range(40), max_tokens=2)
    e.add_request(first)
    await drain(first)
    e.add_request(again)
    await drain(again)
    # 40 tokens fill two 16-token blocks; the repeat hits both and writes nothing new.
    assert (first.num_created_cache_tokens, again.num_created_cache_tokens) == (32, 0)
    s = e.stats
    assert s.prompt_tokens_cached == s.prompt_tokens_cached_by_source["device"] == 32
    assert s.request_prefill_kv_computed_tokens.total == 40 + 8
    assert s.request_params_max_tokens.total == 4 and s.request_params_n.count == 2
    assert s.iteration_tokens.count == s.steps and s.iteration_tokens.total == 40 + 8 + 2


async def test_abort_frees_blocks_and_counts(running_engine):
    e = running_engine(latency=LatencyModel(decode_s_per_step=0.05))
    r = request(range(64), max_tokens=1000)
    e.add_request(r)
    await r.outputs.get()  # first token
    e.abort(r)
    assert r.status is Status.FINISHED and r.finish_reason == "abort"
    assert e.pool.num_free == e.pool.num_usable
    assert e.stats.finished["abort"] == 1


async def test_ttft_is_queueing_plus_uncached_prefill(running_engine):
    lat = LatencyModel(
        prefill_s_per_token=200e-6, decode_s_per_step=0.001, decode_s_per_seq=0, step_overhead_s=0
    )
    e = running_engine(latency=lat, budget=4096)
    cold = request(range(1000), max_tokens=1)
    e.add_request(cold)
    await drain(cold)
    warm = request(range(1000), max_tokens=1)
    e.add_request(warm)
    await drain(warm)
    cold_ttft = cold.first_token_time - cold.arrival_time
    warm_ttft = warm.first_token_time - warm.arrival_time
    # 1000 uncached tokens take 0.2 s; the warm one recomputes only 8 tokens.
    assert cold_ttft >= 0.2
    assert warm_ttft < cold_ttft / 4


async def test_natural_answer_length_ends_with_eos(running_engine):
    e = running_engine()
    e._eos = 2
    r = request(range(30), max_tokens=100)
    r.natural_len = 7
    e.add_request(r)
    outs = await drain(r)
    assert len(outs) == 7 and outs[-1].finish_reason == "stop"
    assert outs[-1].token_id == 2 and outs[-1].text == ""
    ignoring = request(range(30), max_tokens=12)
    ignoring.natural_len = 3
    ignoring.params.ignore_eos = True
    e.add_request(ignoring)
    outs = await drain(ignoring)
    assert len(outs) == 12 and outs[-1].finish_reason == "length"


async def generate(e: Engine, **kw) -> tuple[SimRequest, list]:
    r = request(**kw)
    e.add_request(r)
    return r, await asyncio.wait_for(drain(r), 5)


async def test_stop_strings_do_not_break_eos_or_stop_token_finishes(running_engine):
    e = running_engine()
    e._eos = 2
    r = request(range(30), max_tokens=100, stop=("never",))
    r.natural_len = 5
    e.add_request(r)
    outs = await drain(r)
    assert outs[-1].finish_reason == "stop" and len(outs) == 5
    assert outs[-1].stop_reason is None  # EOS, as in vLLM
    plain, _ = await generate(e, prompt=range(30), max_tokens=8, seed=1)
    tok = plain.output_token_ids[3]
    first = plain.output_token_ids.index(tok)
    r, outs = await generate(
        e, prompt=range(30), max_tokens=8, seed=1, stop=("never",), stop_token_ids=frozenset({tok})
    )
    assert len(outs) == first + 1 and outs[-1].finish_reason == "stop"
    # vLLM shows no text for the stop token itself, and names it in stop_reason.
    assert outs[-1].stop_reason == tok
    want = "".join(TEXTS[t] for t in plain.output_token_ids[:first])
    assert "".join(o.text for o in outs) == r.output_text == want
    assert e.stats.finished["error"] == 0


async def test_stream_holds_back_text_a_stop_string_may_cut(running_engine):
    e = running_engine()
    plain, _ = await generate(e, prompt=range(30), max_tokens=10, seed=2)
    texts = [TEXTS[t] for t in plain.output_token_ids]
    full = "".join(texts)
    stop = texts[4][-2:] + texts[5][:2]  # spans two tokens
    r, outs = await generate(e, prompt=range(30), max_tokens=10, seed=2, stop=("x" * 9, stop))
    # What was streamed is exactly the final text: nothing sent that the stop string cut.
    assert "".join(o.text for o in outs) == r.output_text == full[: full.find(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    r, outs = await generate(e, prompt=range(30), max_tokens=10, seed=2, stop=("no such",))
    assert outs[0].text == texts[0][:-6]  # held back: the longest stop string minus one
    assert "".join(o.text for o in outs) == r.output_text == full
    assert outs[-1].finish_reason == "length" and outs[-1].stop_reason is None


async def test_stop_string_longer_than_64_chars_matches(running_engine):
    e = running_engine()
    plain, _ = await generate(e, prompt=range(30), max_tokens=60, seed=3)
    full = plain.output_text
    stop = full[100:200]
    r, outs = await generate(e, prompt=range(30), max_tokens=60, seed=3, stop=(stop,))
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert r.output_text == full[: full.find(stop)]


async def test_a_request_larger_than_the_kv_cache_is_refused(running_engine):
    e = running_engine(num_blocks=5)  # 4 usable blocks of 16: 64 tokens
    with pytest.raises(ValueError, match="KV cache"):
        e.add_request(request(range(40), max_tokens=40))  # would need 79 tokens of KV
    # 40 + 25 needs 64 (the last sampled token never gets KV): it fits, and runs.
    r, _ = await generate(e, prompt=range(40), max_tokens=25)
    assert len(r.output_token_ids) == 25 and e.stats.preemptions == 0


async def test_engine_waits_instead_of_polling_when_nothing_fits(running_engine):
    e = running_engine(num_blocks=5)
    holder = request(range(64))
    assert e.pool.allocate(holder, 64, [])  # every block is held outside the engine
    calls = 0
    schedule = e._schedule

    def counting():
        nonlocal calls
        calls += 1
        return schedule()

    e._schedule = counting
    r = request(range(10), max_tokens=2)
    e.add_request(r)
    await asyncio.sleep(0.1)
    assert calls <= 2
    e.pool.free(holder)
    late = request(range(100, 110), max_tokens=2)
    e.add_request(late)  # an arrival wakes the loop
    await asyncio.wait_for(asyncio.gather(drain(r), drain(late)), 5)
