"""The director's gate: a route's token rate limit before scheduling (429 with Retry-After
naming the limit, per route or per verified user, output tokens charged when the answer
ends), InferenceObjective priorities, flow control waiting for a saturated pool, and the
streamed usage the picker asks for and hides again. Real Director, Datastore, limiter and
admission controller; no processes."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import generate_latest

from infergw.epp.director import Director, DirectorOptions
from infergw.epp.errors import PickerError
from infergw.epp.flowcontrol import FlowControlConfig
from infergw.epp.gatekeeper import Gatekeeper
from infergw.epp.metric_collectors import FlowQueueCollector
from infergw.epp.metrics import OTHER_MODEL, BoundedLabel, PickerMetrics
from infergw.epp.response import response_chain
from infergw.epp.scheduling.config import load_config
from infergw.epp.scheduling.framework import ResponseInfo
from tests.director_fixtures import (
    LEAST_REQUEST,
    SERVERS,
    context,
    director_with,
    limited_route,
    make_datastore,
)
from tests.director_fixtures import pod as pod_


def done(director: Director, ctx, completion_tokens: int | None = None) -> None:
    ep = director.datastore.endpoint(ctx.targets[0])
    director.finish(
        ctx, ResponseInfo(endpoint=ep, status=200, completion_tokens=completion_tokens), 0.0
    )


async def test_input_tokens_are_limited_exactly_with_retry_after_and_the_limit_named():
    d = director_with(limited_route(inputTokensPerUnit=100))
    prompt = "x" * 80  # no tokenizer configured: about 4 characters a token, so 20 tokens
    for _ in range(5):
        await d.handle(context(prompt=prompt))  # 5 × 20 = the whole minute's budget
    with pytest.raises(PickerError) as err:
        await d.handle(context(prompt=prompt))
    assert err.value.status == 429
    assert "100 input tokens per minute" in err.value.message and "limited" in err.value.message
    assert err.value.headers["retry-after"] == "12"  # 20 tokens at 100 a minute


async def test_each_verified_user_has_a_budget_of_its_own():
    d = director_with(limited_route(inputTokensPerUnit=40, perUser=True))
    ann, bob = {"x-infergate-user": "ann"}, {"x-infergate-user": "bob"}
    await d.handle(context(prompt="x" * 160, headers=ann))  # 40: ann's all
    with pytest.raises(PickerError):
        await d.handle(context(prompt="x" * 8, headers=ann))
    await d.handle(context(prompt="x" * 160, headers=bob))  # bob is untouched


async def test_output_tokens_are_charged_when_the_answer_ends():
    d = director_with(limited_route(outputTokensPerUnit=50))
    ctx = context()
    await d.handle(ctx)
    done(d, ctx, completion_tokens=80)  # 30 over the budget
    await asyncio.sleep(0)  # the charge is a task
    with pytest.raises(PickerError) as err:
        await d.handle(context())
    assert err.value.status == 429 and "output tokens" in err.value.message


async def test_a_route_without_a_limit_is_not_limited():
    d = director_with()
    for _ in range(50):
        await d.handle(context(prompt="x" * 400))


def test_objectives_give_priorities_and_unknown_ones_the_default():
    ds = make_datastore()
    ds.set_objectives(
        [
            {
                "metadata": {"name": "critical"},
                "spec": {"poolRef": {"name": "pool"}, "priority": 10},
            },
            {"metadata": {"name": "batch"}, "spec": {"poolRef": {"name": "pool"}, "priority": -1}},
            {
                "metadata": {"name": "elsewhere"},
                "spec": {"poolRef": {"name": "other"}, "priority": 5},
            },
        ]
    )
    assert ds.priority_of("critical") == 10 and ds.priority_of("batch") == -1
    assert (
        ds.priority_of("elsewhere") == 0
        and ds.priority_of("nope") == 0
        and ds.priority_of(None) == 0
    )


async def test_requests_wait_while_the_pool_is_saturated_and_go_when_it_clears():
    d = director_with(flow_control=FlowControlConfig())
    for ep in d.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 10, 1e18  # saturated, fresh forever
    first = d.datastore.endpoints()[0]
    only = [first.address]  # one candidate, so the dispatched request lands there
    low = asyncio.create_task(
        d.handle(context(headers={"x-gateway-inference-fairness-id": "a"}, subset=only))
    )
    await asyncio.sleep(0.1)
    assert not low.done() and d.gate.queue.queued_requests == 1
    d.datastore.set_objectives([{"metadata": {"name": "vip"}, "spec": {"priority": 5}}])
    high = asyncio.create_task(
        d.handle(context(headers={"x-gateway-inference-objective": "vip"}, subset=only))
    )
    await asyncio.sleep(0.1)
    # Sheddable requests are turned away at once while the pool is saturated.
    d.datastore.set_objectives(
        [
            {"metadata": {"name": "vip"}, "spec": {"priority": 5}},
            {"metadata": {"name": "bulk"}, "spec": {"priority": -1}},
        ]
    )
    with pytest.raises(PickerError) as err:
        await d.handle(context(headers={"x-gateway-inference-objective": "bulk"}))
    assert err.value.status == 429 and "retry-after" in err.value.headers
    first.metrics.waiting = 5  # at the threshold: room for one more
    d.gate.notify()
    winner = await asyncio.wait_for(
        asyncio.wait({low, high}, return_when=asyncio.FIRST_COMPLETED), 2
    )
    assert high in winner[0] and not low.done()  # the higher priority overtook the waiting one
    low.cancel()
    await asyncio.sleep(0.05)
    assert d.gate.queue.queued_requests == 0  # a client that left is out of the queue at once
    await d.gate.close()


async def test_streamed_requests_ask_for_usage_when_it_is_charged_and_hide_it_again():
    d = director_with(limited_route(outputTokensPerUnit=1000))
    ctx = context(stream=True)
    await d.handle(ctx)
    assert ctx.strip_usage
    sent = json.loads(ctx.upstream_body())
    assert sent["stream_options"] == {"include_usage": True} and sent["model"] == "m"
    asked = context(stream=True, stream_options='{"include_usage": true}')
    await d.handle(asked)
    assert not asked.strip_usage  # the client asked: it keeps its usage event
    plain = director_with()
    ctx = context(stream=True)
    await plain.handle(ctx)
    assert not ctx.strip_usage and ctx.upstream_body() is ctx.request.raw_body


def test_the_usage_event_is_removed_across_any_split():
    events = (
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
        b'data: {"choices":[{"text":"b"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 4, 9, 50, 1000):
        chain, _usage = response_chain(streaming=True, strip_usage=True)
        parts = [chain.feed(events[i : i + size]) for i in range(0, len(events), size)]
        out = b"".join(b"".join(p) for p in [*parts, chain.flush()])
        assert out == events.replace(
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n', b""
        )


async def test_a_stream_the_client_leaves_is_charged_for_the_tokens_it_got():
    """No usage event comes when the client leaves mid-answer: the events that passed count
    (one a token), so leaving early does not dodge an output limit."""
    from infergw.epp.extproc import _Stream
    from tests import extproc_client as ec

    d = director_with(limited_route(outputTokensPerUnit=50))
    stream = _Stream(d)
    stream.on_request_headers(ec.headers())
    await stream.on_request_body(ec.body({"model": "m", "prompt": "hi", "stream": True}))
    stream.on_response_headers(ec.response_headers(content_type="text/event-stream"))
    for _ in range(60):  # 60 tokens of a longer answer, then the client is gone
        stream.on_response_body(ec.response_body(b'data: {"choices":[{"text":"a"}]}\n\n', False))
    stream.close()
    await asyncio.sleep(0)  # the charge is a task
    level = d.gate._limiters["limited"][1].output.level("limited")
    assert level == pytest.approx(50 - 59, abs=0.1)  # at most one token short
    with pytest.raises(PickerError) as err:
        await d.handle(context())
    assert err.value.status == 429 and "50 output tokens per minute" in err.value.message
    # A stream with its usage is charged what the usage says, not what was counted.
    d = director_with(limited_route(outputTokensPerUnit=50))
    stream = _Stream(d)
    stream.on_request_headers(ec.headers())
    await stream.on_request_body(ec.body({"model": "m", "prompt": "hi", "stream": True}))
    stream.on_response_headers(ec.response_headers(content_type="text/event-stream"))
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":7}}\n\n'
    for chunk in (b'data: {"choices":[{"text":"a"}]}\n\n', usage, b"data: [DONE]\n\n"):
        stream.on_response_body(ec.response_body(chunk, chunk.endswith(b"[DONE]\n\n")))
    await asyncio.sleep(0)
    assert d.gate._limiters["limited"][1].output.level("limited") == pytest.approx(43, abs=0.1)


async def test_a_servers_retry_attempts_cap_the_fallback_endpoints():
    def director_for(attempts: int | None) -> Director:
        server = {**SERVERS[0], "spec": {**SERVERS[0]["spec"]}}
        if attempts is not None:
            server["spec"]["trafficPolicy"] = {"retry": {"attempts": attempts}}
        ds = make_datastore()
        ds.set_routes(limited_route(inputTokensPerUnit=10**9), [server])
        metrics = PickerMetrics()
        options = DirectorOptions(fallbacks=3)
        return Director(
            ds, load_config(LEAST_REQUEST), metrics, options, Gatekeeper(metrics.registry)
        )

    assert len(await director_for(None).handle(context())) == 4  # the picker's own 1 + 3
    assert len(await director_for(0).handle(context())) == 1
    assert len(await director_for(2).handle(context())) == 3


async def test_a_flows_answers_teach_the_output_charged_at_its_next_dispatch():
    d = director_with(flow_control=FlowControlConfig())
    for ep in d.datastore.endpoints():
        ep.metrics.updated_at = 1e18  # fresh and idle: requests go at once
    flow = {"x-gateway-inference-fairness-id": "team"}
    first = context(headers=flow, max_tokens=500)
    await d.handle(first)
    assert first.ticket.item.expected_output == 0  # nothing known about the flow yet
    done(d, first, completion_tokens=120)
    second = context(headers=flow, max_tokens=500)
    await d.handle(second)
    assert second.ticket.item.expected_output == 120
    capped = context(headers=flow, max_tokens=50)
    await d.handle(capped)
    assert capped.ticket.item.expected_output == 50  # never more than it may produce
    other = context(headers={"x-gateway-inference-fairness-id": "else"})
    await d.handle(other)
    assert other.ticket.item.expected_output == 0
    await d.gate.close()


def saturate(d: Director) -> None:
    for ep in d.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 10, 1e18


async def test_a_request_turned_away_after_the_rate_limit_gets_its_tokens_back():
    d = director_with(limited_route(inputTokensPerUnit=40), flow_control=FlowControlConfig())
    saturate(d)
    d.datastore.set_objectives([{"metadata": {"name": "bulk"}, "spec": {"priority": -1}}])
    bulk = {"x-gateway-inference-objective": "bulk"}
    for _ in range(3):  # each would take the whole budget, and each is shed
        with pytest.raises(PickerError) as err:
            await d.handle(context(prompt="x" * 160, headers=bulk))
        assert "sheddable" in err.value.message
        await asyncio.sleep(0)  # the refund is a task
    for ep in d.datastore.endpoints():
        ep.metrics.waiting = 0
    await d.handle(context(prompt="x" * 160))  # the budget is whole
    await d.gate.close()


async def test_sheddable_requests_are_shed_without_a_queue_too():
    d = director_with()
    saturate(d)
    d.datastore.set_objectives([{"metadata": {"name": "bulk"}, "spec": {"priority": -1}}])
    with pytest.raises(PickerError) as err:
        await d.handle(context(headers={"x-gateway-inference-objective": "bulk"}))
    assert err.value.status == 429 and err.value.headers["retry-after"]
    await d.handle(context())  # others still go: there is no queue to wait in


async def test_a_routed_request_ignores_a_clients_model_rewrite():
    d = director_with(limited_route(inputTokensPerUnit=10**6))
    ctx = context(headers={"x-gateway-model-name-rewrite": "secret-adapter"})
    await d.handle(ctx)
    assert ctx.target_model == "m"  # the ModelServer's model, not the client's choice
    assert json.loads(ctx.upstream_body())["model"] == "m"


async def test_a_request_whose_pods_left_does_not_hold_the_queue():
    d = director_with(flow_control=FlowControlConfig(default_request_ttl=5))
    saturate(d)
    a0 = d.datastore.endpoints()[0].address
    pinned = asyncio.create_task(d.handle(context(subset=[a0])))
    await asyncio.sleep(0.05)
    other = asyncio.create_task(d.handle(context()))
    await asyncio.sleep(0.05)
    d.datastore.replace_pods([pod_("b", "10.0.0.2")])  # a0's pod is gone, b's is idle
    for ep in d.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 0, 1e18
    d.gate.notify()
    with pytest.raises(PickerError) as err:
        await asyncio.wait_for(pinned, 1)  # answered at once, not after its TTL
    assert err.value.status == 503
    assert await asyncio.wait_for(other, 1)
    await d.gate.close()


def test_an_endpoint_that_leaves_takes_its_metric_series_along():
    metrics = PickerMetrics()
    metrics.pd_picks.labels("decode", "10.0.0.1:8000").inc()
    metrics.pd_picks.labels("prefill", "10.0.0.2:8000").inc()
    metrics.scrape_errors.labels("10.0.0.1:8000", "TimeoutError").inc()
    metrics.forget_endpoint("10.0.0.1:8000")
    text = generate_latest(metrics.registry).decode()
    assert "10.0.0.1:8000" not in text and 'endpoint="10.0.0.2:8000"' in text


async def test_flow_controls_wait_is_recorded_with_how_each_request_left():
    d = director_with(flow_control=FlowControlConfig(), pool="pool")
    for ep in d.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 10, 1e18  # saturated, fresh forever
    waiting = asyncio.create_task(
        d.handle(context(headers={"x-gateway-inference-fairness-id": "a"}))
    )
    await asyncio.sleep(0.1)
    collected = {
        s.name: s
        for f in FlowQueueCollector(
            d.gate.queue, d.gate.detector, d.datastore, d.metrics, "pool"
        ).collect()
        for s in f.samples
    }
    assert collected["inference_extension_flow_control_queue_size"].labels["fairness_id"] == "a"
    assert collected["inference_extension_flow_control_queue_size"].value == 1
    waiting.cancel()
    await asyncio.sleep(0.05)
    d.datastore.set_objectives([{"metadata": {"name": "bulk"}, "spec": {"priority": -1}}])
    with pytest.raises(PickerError):
        await d.handle(context(headers={"x-gateway-inference-objective": "bulk"}))

    def count(outcome: str, **labels) -> float:
        name = "inference_extension_flow_control_request_queue_duration_seconds_count"
        value = d.metrics.registry.get_sample_value(
            name,
            {
                "model_name": "m",
                "target_model_name": "m",
                "inference_pool": "pool",
                "outcome": outcome,
                **labels,
            },
        )
        return value or 0.0

    # under the reference's outcome names
    assert count("EvictedContextCancelled", fairness_id="a", priority="0") == 1
    assert count("RejectedCapacity", fairness_id="default-flow", priority="-1") == 1
    # llm-d's count by outcome: the same two requests, without model and flow
    for outcome, priority in (("EvictedContextCancelled", "0"), ("RejectedCapacity", "-1")):
        left = {"outcome": outcome, "priority": priority, "inference_pool": "pool"}
        total = "llm_d_epp_flow_control_requests_total"
        assert d.metrics.registry.get_sample_value(total, left) == 1
    enqueued = "inference_extension_flow_control_request_enqueue_duration_seconds_count"
    queued = {"fairness_id": "a", "priority": "0", "outcome": "NotYetFinalized"}
    assert d.metrics.registry.get_sample_value(enqueued, queued) == 1
    cycles = "inference_extension_flow_control_dispatch_cycle_duration_seconds_count"
    assert d.metrics.registry.get_sample_value(cycles, {}) >= 1  # it looked for room
    await d.gate.close()


def test_fairness_ids_past_the_bound_share_one_series():
    label = BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        OTHER_MODEL,
        "a",
        OTHER_MODEL,
    ]
