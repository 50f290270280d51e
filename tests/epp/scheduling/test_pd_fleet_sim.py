"""The simulated P/D fleet's engines keep the latency model's times (simulator/latency.py)."""

from __future__ import annotations

import pytest

from infergw.simulator.latency import StepWork, attention_pairs
from tests.epp.scheduling.pd_fleet_sim import H100, Arrival, Decider, Fleet, replay


def test_a_lone_prompt_takes_one_prefill_step_then_a_decode_step_a_token():
    r = replay(Fleet(both=1), Decider(0), [Arrival(0.0, 2000, 3, True)]).reqs[0]
    prefill = H100.work_seconds(StepWork(2000, 0, 0, attention_pairs(2000, 0)))
    assert r.ttft == pytest.approx(prefill)  # 79.5 ms: README "Latency profiles"
    decode = H100.work_seconds(StepWork(0, 1, 2000, 0))  # then 2001
    assert r.tpot == pytest.approx((decode + H100.work_seconds(StepWork(0, 1, 2001, 0))) / 2)


def test_a_prompt_longer_than_the_budget_is_chunked():
    r = replay(Fleet(both=1, token_budget=1000), Decider(0), [Arrival(0.0, 2500, 1, True)])
    steps = [(1000, 0), (1000, 1000), (500, 2000)]
    want = sum(H100.work_seconds(StepWork(n, 0, c, attention_pairs(n, c))) for n, c in steps)
    assert r.reqs[0].ttft == pytest.approx(want)


def test_a_prefill_in_the_same_step_slows_the_decodes_and_disaggregation_removes_it():
    # one long-output request decoding, then a 8,000-token prompt arrives
    trace = [Arrival(0.0, 100, 64, False), Arrival(0.05, 8000, 2, True)]
    agg = replay(Fleet(both=2), Decider(0), trace).reqs
    pd = replay(Fleet(prefill=1, decode=1, both=0), Decider(1), trace).reqs
    alone = replay(Fleet(both=1), Decider(0), trace[:1]).reqs[0]
    # aggregated on one pod? the picker spreads them over the two: no stall either way
    assert agg[0].decode_pod != agg[1].decode_pod
    assert agg[0].tpot == pytest.approx(alone.tpot, rel=0.01)
    one_pod = replay(Fleet(both=1), Decider(0), trace).reqs
    assert one_pod[0].tpot > alone.tpot + 0.3 / 63  # ≥ one ~345 ms prefill step in its gaps
    # disaggregated: the decode pod only computes the last prompt token
    assert pd[1].prefill_pod is not None and pd[0].decode_pod == pd[1].decode_pod
    assert pd[0].tpot < alone.tpot * 1.05
    # and the long prompt's first token pays the KV pull (500 blocks) and two hops
    prefill = H100.work_seconds(StepWork(8000, 0, 0, attention_pairs(8000, 0)))
    floor = prefill + H100.transfer_seconds(500) + 2 * Fleet().hop_s
    assert floor < pd[1].ttft < floor + 0.02  # + the decode pod's step for the last token
