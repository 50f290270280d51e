"""epp/director.py: candidates → model catalog → schedule → handle, and finish's bookkeeping.

A real Datastore, real SchedulingConfig and real PickerMetrics; no processes, no network.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from infergw.epp.director import EWMA_ALPHA, Director
from infergw.epp.errors import PickerError
from infergw.epp.scheduling.framework import PostResponse, ResponseInfo
from infergw.epp.trust import HeaderTrust
from tests.director_fixtures import (
    A0,
    A1,
    B0,
    B1,
    EVERYONE,
    HEAD,
    context,
    director_with,
    limited_route,
    make_director,
    set_models,
    status_of,
)


@pytest.fixture
def director() -> Director:
    return make_director(fallbacks=0)


async def handle_status(d, ctx) -> int | None:
    try:
        await d.handle(ctx)
    except PickerError as exc:
        return exc.status
    return None


def sample(d: Director, name: str, **labels) -> float:
    return d.metrics.registry.get_sample_value(name, labels) or 0.0


def ok(endpoint=None, **kw) -> ResponseInfo:
    return ResponseInfo(endpoint=endpoint, status=200, **kw)


# ---- handle / finish: in-flight counts -----------------------------------------------------


async def test_handle_counts_the_request_on_the_primary(director):
    ctx = context(max_tokens=100, prompt="x" * 40)  # ~10 prompt tokens
    targets = await director.handle(ctx)
    assert len(targets) == 1
    primary = targets[0]
    assert ctx.targets == [primary.address]
    assert primary.inflight_requests == 1
    assert primary.inflight_tokens == ctx.request.approx_prompt_tokens + 100
    others = [e for e in director.datastore.endpoints() if e is not primary]
    assert all(e.inflight_requests == 0 and e.inflight_tokens == 0 for e in others)


async def test_finish_releases_the_primary(director):
    ctx = context()
    (primary,) = await director.handle(ctx)
    director.finish(ctx, ok(primary), time.monotonic())
    assert (primary.inflight_requests, primary.inflight_tokens) == (0, 0)


@pytest.mark.parametrize("status", [0, 500, 429, 200])
async def test_finish_releases_whatever_the_outcome(director, status):
    ctx = context()
    (primary,) = await director.handle(ctx)
    director.finish(ctx, ResponseInfo(endpoint=None, status=status), time.monotonic())
    assert primary.inflight_requests == 0
    assert primary.inflight_tokens == 0


async def test_in_flight_counts_track_concurrent_requests(director):
    reqs = [context() for _ in range(8)]
    for r in reqs:
        await director.handle(r)
    # least-request spreads 8 requests over 4 endpoints: two each.
    assert {
        e.address: e.inflight_requests for e in director.datastore.endpoints()
    } == dict.fromkeys(EVERYONE, 2)
    for r in reqs[:5]:
        director.finish(r, ok(), time.monotonic())
    assert sum(e.inflight_requests for e in director.datastore.endpoints()) == 3
    for r in reqs[5:]:
        director.finish(r, ok(), time.monotonic())
    assert all(e.inflight_requests == 0 for e in director.datastore.endpoints())
    assert all(e.inflight_tokens == 0 for e in director.datastore.endpoints())


async def test_finish_never_goes_below_zero(director):
    ctx = context()
    (primary,) = await director.handle(ctx)
    primary.inflight_requests = primary.inflight_tokens = 0  # e.g. reset by a rebuild
    director.finish(ctx, ok(primary), time.monotonic())
    assert (primary.inflight_requests, primary.inflight_tokens) == (0, 0)


async def test_finish_after_the_primary_left_the_pool(director):
    ctx = context()
    await director.handle(ctx)
    director.datastore.replace_pods([])
    director.finish(ctx, ok(), time.monotonic())  # no error


async def test_bookkeeping_metrics(director):
    ctx = context(model="m")
    await director.handle(ctx)
    labels = {"model_name": "m", "target_model_name": "m"}
    assert sample(director, "inference_objective_request_total", priority="0", **labels) == 1
    assert sample(director, "inference_objective_running_requests", model_name="m") == 1
    size = len(ctx.request.raw_body)
    assert sample(director, "inference_objective_request_sizes_sum", **labels) == size
    info = ok(prompt_tokens=10, completion_tokens=5, ttft=0.25, tpot=0.02, response_bytes=321)
    director.finish(ctx, info, time.monotonic())
    assert sample(director, "inference_objective_running_requests", model_name="m") == 0
    assert sample(director, "inference_objective_request_duration_seconds_count", **labels) == 1
    assert sample(director, "inference_objective_input_tokens_sum", **labels) == 10
    assert sample(director, "inference_objective_output_tokens_sum", **labels) == 5
    assert sample(director, "inference_objective_request_ttft_seconds_sum", **labels) == 0.25
    assert sample(director, "inference_objective_request_tpot_seconds_sum", **labels) == 0.02
    assert sample(director, "inference_objective_response_sizes_sum", **labels) == 321


async def test_a_failed_answer_teaches_no_latency(director):
    ctx = context(model="m")
    await director.handle(ctx)
    director.finish(
        ctx, ResponseInfo(endpoint=None, status=500, ttft=0.01, tpot=0.01), time.monotonic()
    )
    labels = {"model_name": "m", "target_model_name": "m"}
    assert sample(director, "inference_objective_request_ttft_seconds_count", **labels) == 0
    assert sample(director, "inference_objective_request_tpot_seconds_count", **labels) == 0


async def test_scheduling_attempts_name_the_primary_and_go_with_its_pod(director):
    ctx = context(model="m")
    (primary,) = (await director.handle(ctx))[:1]
    port = primary.address.rpartition(":")[2]
    attempt = {"status": "success", "target_model_name": "m", "pod_name": primary.pod}
    assert (
        sample(
            director,
            "inference_extension_scheduler_attempts_total",
            port=port,
            namespace=(director.datastore.pool.namespace),
            **attempt,
        )
        == 1
    )
    director.metrics.forget_endpoint(primary.address)
    names = {s.name for f in director.metrics.registry.collect() for s in f.samples}
    assert "inference_extension_scheduler_attempts_total" not in names


@pytest.mark.parametrize(("status", "code"), [(0, "cancelled"), (500, "500"), (404, "404")])
async def test_errors_are_counted_by_code(director, status, code):
    ctx = context()
    await director.handle(ctx)
    director.finish(ctx, ResponseInfo(endpoint=None, status=status), time.monotonic())
    labels = {"model_name": "m", "target_model_name": "m"}
    assert (
        sample(director, "inference_objective_request_error_total", error_code=code, **labels) == 1
    )
    assert sample(director, "inference_objective_request_duration_seconds_count", **labels) == 0
    assert sample(director, "inference_objective_running_requests", model_name="m") == 0


async def test_scheduling_is_timed(director):
    await director.handle(context())
    assert sample(director, "inference_extension_scheduler_e2e_duration_seconds_count") == 1
    assert (
        sample(
            director,
            "inference_extension_plugin_duration_seconds_count",
            extension_point="Scorer",
            plugin_type="least-request",
            plugin_name="least-request",
        )
        == 1
    )


# ---- fallbacks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fallbacks", "expected"), [(0, 1), (1, 2), (3, 4), (9, 4)])
async def test_fallbacks_give_more_targets_primary_first(fallbacks, expected):
    d = make_director(fallbacks=fallbacks)
    ctx = context()
    targets = await d.handle(ctx)
    assert len(targets) == expected
    assert len(set(ctx.targets)) == expected
    assert ctx.targets == [e.address for e in targets]
    # Only the primary counts the request in flight.
    assert [e.inflight_requests for e in targets] == [1] + [0] * (expected - 1)


async def test_default_options_have_one_fallback():
    d = make_director()
    assert len(await d.handle(context())) == 2


# ---- subset hint --------------------------------------------------------------------------


def test_no_subset_means_every_ready_endpoint(director):
    assert {e.address for e in director.eligibility.candidates(None)} == EVERYONE
    director.datastore.endpoint(A0).reachable = False
    assert {e.address for e in director.eligibility.candidates(None)} == EVERYONE - {A0}


async def test_empty_subset_is_503(director):
    assert status_of(director.eligibility.candidates, []) == 503
    assert await handle_status(director, context(subset=[])) == 503


async def test_subset_ip_port_is_exact(director):
    assert [e.address for e in director.eligibility.candidates([A1])] == [A1]
    for _ in range(5):
        assert (await director.handle(context(subset=[A1])))[0].address == A1


def test_subset_bare_ip_is_every_port_of_that_ip(director):
    assert {e.address for e in director.eligibility.candidates(["10.0.0.2"])} == {B0, B1}


def test_subset_mixed(director):
    assert {e.address for e in director.eligibility.candidates(["10.0.0.2", A0])} == {A0, B0, B1}


@pytest.mark.parametrize("subset", [["10.9.9.9:8000"], ["10.0.0.1:9999"], ["10.0.0.3"]])
def test_subset_with_nothing_in_the_pool_is_503(director, subset):
    assert status_of(director.eligibility.candidates, subset) == 503


def test_subset_skips_unreachable_endpoints(director):
    director.datastore.endpoint(A1).reachable = False
    assert status_of(director.eligibility.candidates, [A1]) == 503


def test_subset_filter_can_be_turned_off():
    d = make_director(fallbacks=0, subset_filter=False)
    assert {e.address for e in d.eligibility.candidates([A1])} == EVERYONE
    assert {e.address for e in d.eligibility.candidates([])} == EVERYONE


async def test_empty_pool_is_503_at_once_without_a_capacity_wait(director):
    director.datastore.replace_pods([])
    director.gate.capacity.ttl = 0  # with one, it waits for a pod (test_capacity_wait.py)
    assert await handle_status(director, context()) == 503


async def test_filter_leaving_nothing_is_429(director):
    ctx = context(headers={"test-epp-endpoint-selection": "10.9.9.9"})
    assert await handle_status(director, ctx) == 429


async def test_subset_and_test_header_combine(director):
    ctx = context(
        headers={"test-epp-endpoint-selection": "10.0.0.1"}, subset=["10.0.0.1:8001", "10.0.0.2"]
    )
    assert (await director.handle(ctx))[0].address == A1


# ---- model catalog ------------------------------------------------------------------------


async def test_unknown_model_is_404_when_every_catalog_is_known(director):
    set_models(director, {a: {"m"} for a in EVERYONE})
    assert await handle_status(director, context(model="other")) == 404


async def test_a_pod_with_an_unknown_catalog_lets_the_request_through(director):
    set_models(director, {A0: {"m"}, A1: {"m"}, B0: {"m"}, B1: None})
    targets = await director.handle(context(model="other"))
    assert [e.address for e in targets] == [B1]  # only B1 may serve it


async def test_requests_go_only_to_endpoints_serving_the_model(director):
    set_models(director, {A0: {"m"}, A1: {"m", "lora-x"}, B0: {"m"}, B1: {"m"}})
    for _ in range(4):
        assert (await director.handle(context(model="lora-x")))[0].address == A1


async def test_model_served_only_outside_the_subset_is_503(director):
    set_models(director, {A0: {"lora-x"}, A1: {"m"}, B0: {"m"}, B1: {"m"}})
    assert await handle_status(director, context(model="lora-x", subset=[B0, B1])) == 503


async def test_model_served_only_by_an_unreachable_endpoint_is_503(director):
    set_models(director, {A0: {"lora-x"}, A1: {"m"}, B0: {"m"}, B1: {"m"}})
    director.datastore.endpoint(A0).reachable = False
    assert await handle_status(director, context(model="lora-x")) == 503


async def test_catalog_check_uses_a_trusted_rewritten_model():
    director = make_director(fallbacks=0, trust=HeaderTrust(model_rewrite_header=True))
    set_models(director, {a: {"m-v2"} for a in EVERYONE})
    ctx = context(model="m", headers={"x-gateway-model-name-rewrite": "m-v2"})
    assert await director.handle(ctx)
    plain = context(model="m-v2", headers={"x-gateway-model-name-rewrite": "m"})
    assert await handle_status(director, plain) == 404


async def test_fallbacks_also_serve_the_model():
    d = make_director(fallbacks=3)
    set_models(d, {A0: {"m", "x"}, A1: {"m"}, B0: {"m", "x"}, B1: {"m"}})
    assert {e.address for e in await d.handle(context(model="x"))} == {A0, B0}


# ---- latency averages ---------------------------------------------------------------------


async def test_first_observation_sets_the_average(director):
    ctx = context()
    (primary,) = await director.handle(ctx)
    director.finish(ctx, ok(primary, ttft=0.5, tpot=0.02), time.monotonic())
    assert primary.ttft_ewma == 0.5
    assert primary.tpot_ewma == 0.02


async def test_later_observations_are_exponentially_weighted(director):
    ep = director.datastore.endpoint(A0)
    ep.ttft_ewma, ep.tpot_ewma = 1.0, 0.1
    ctx = context(subset=[A0])
    await director.handle(ctx)
    director.finish(ctx, ok(ep, ttft=2.0, tpot=0.2), time.monotonic())
    assert EWMA_ALPHA == 0.2
    assert ep.ttft_ewma == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
    assert ep.tpot_ewma == pytest.approx(0.8 * 0.1 + 0.2 * 0.2)


async def test_the_served_endpoint_learns_not_the_primary(director):
    ctx = context(subset=[A0])
    await director.handle(ctx)
    served = director.datastore.endpoint(B1)  # the proxy fell back
    director.finish(ctx, ok(served, ttft=0.3), time.monotonic())
    assert served.ttft_ewma == 0.3
    assert director.datastore.endpoint(A0).ttft_ewma is None
    assert director.datastore.endpoint(A0).inflight_requests == 0


async def test_without_ttft_nothing_is_learned(director):
    ctx = context()
    (primary,) = await director.handle(ctx)
    director.finish(ctx, ok(primary, ttft=None, tpot=0.05), time.monotonic())
    assert primary.ttft_ewma is None and primary.tpot_ewma is None


async def test_ttft_without_tpot_keeps_tpot(director):
    ctx = context()
    (primary,) = await director.handle(ctx)
    primary.tpot_ewma = 0.01
    director.finish(ctx, ok(primary, ttft=0.4), time.monotonic())
    assert primary.ttft_ewma == 0.4
    assert primary.tpot_ewma == 0.01


@pytest.mark.parametrize("status", [500, 503, 0])
async def test_failed_answers_do_not_teach_latency(director, status):
    ctx = context()
    (primary,) = await director.handle(ctx)
    primary.ttft_ewma = 1.0
    director.finish(
        ctx, ResponseInfo(endpoint=primary, status=status, ttft=0.001), time.monotonic()
    )
    assert primary.ttft_ewma == 1.0


# ---- plugins around the request -----------------------------------------------------------


async def test_pre_request_plugins_see_the_choice():
    config = (
        HEAD
        + """\
plugins:
- type: least-request
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: least-request, weight: 1}, {pluginRef: session-affinity-scorer, weight: 10}]
"""
    )
    d = make_director(config, fallbacks=0)
    first = (await d.handle(context(headers={"x-session-id": "s1"})))[0]
    # The session's pod is busy now, yet the session sticks to it.
    for _ in range(3):
        assert (await d.handle(context(headers={"x-session-id": "s1"})))[0] is first
    assert first.inflight_requests == 4


async def test_prefix_cache_routes_a_repeated_prompt_to_the_same_pod():
    config = (
        HEAD
        + """\
plugins: [{type: least-request}, {type: prefix-cache-scorer}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: least-request}, {pluginRef: prefix-cache-scorer, weight: 3}]
"""
    )
    d = make_director(config, fallbacks=0)
    prompt = "a shared system prompt " * 20
    first = (await d.handle(context(prompt=prompt)))[0]
    assert (await d.handle(context(prompt=prompt)))[0] is first


class Recorder(PostResponse):
    type_name = "recorder"

    def __init__(self, fail: bool = False):
        super().__init__("recorder")
        self.fail = fail
        self.seen: list[int] = []

    def post_response(self, ctx, info):
        self.seen.append(info.status)
        if self.fail:
            raise RuntimeError("plugin bug")


async def test_post_response_plugins_are_called_and_their_errors_contained(director):
    broken, working = Recorder(fail=True), Recorder()
    director.scheduling.post_response.extend([broken, working])
    ctx = context()
    (primary,) = await director.handle(ctx)
    director.finish(ctx, ok(primary), time.monotonic())
    assert broken.seen == [200] and working.seen == [200]
    assert primary.inflight_requests == 0


# ---- body-less requests -------------------------------------------------------------------


def test_bodyless_pick_is_random_among_candidates():
    d = make_director(fallbacks=1)
    firsts = Counter()
    for _ in range(400):
        picked = d.pick_for_bodyless("GET", "/v1/responses/resp_1", None)
        assert len(picked) == 2 and picked[0] is not picked[1]
        firsts[picked[0].address] += 1
    assert set(firsts) == EVERYONE
    assert all(e.inflight_requests == 0 for e in d.datastore.endpoints())


def test_bodyless_pick_honors_the_subset(director):
    assert [e.address for e in director.pick_for_bodyless("GET", "/v1/responses/resp_1", [B0])] == [
        B0
    ]
    assert status_of(director.pick_for_bodyless, "GET", "/v1/responses/resp_1", []) == 503


def test_bodyless_pick_with_no_pods_is_503(director):
    director.datastore.replace_pods([])
    assert status_of(director.pick_for_bodyless, "GET", "/v1/responses/resp_1", None) == 503


# ---- eligibility: one computation for flow control and scheduling --------------------------


def port_8001_director(flow_control=None) -> Director:
    """Model m is routed to a ModelServer whose pods listen on :8001 (A1, B1)."""
    from tests.director_fixtures import NET, SERVERS, director_with

    server = {**SERVERS[0], "spec": {**SERVERS[0]["spec"], "workloadPort": {"port": 8001}}}
    route = {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": "r"},
        "spec": {"modelName": "m", "rules": [{"targetModels": [{"modelServerName": "all"}]}]},
    }
    d = director_with(flow_control=flow_control)
    d.datastore.set_routes([route], [server])
    return d


async def test_the_eligible_endpoints_are_the_routes_within_the_subset():
    d = port_8001_director()
    ctx = context(subset=[A1, B0])
    (target,) = await d.handle(ctx)
    assert target.address == A1 and ctx.resolution is not None
    assert [e.address for e in d.eligibility.endpoints(ctx)] == [A1]
    assert {e.address for e in d.eligibility.endpoints(context())} == EVERYONE  # no route yet


def adapter_route_director() -> Director:
    """A route answering m and its LoRA adapter lora-x, on every pod (ModelServer all)."""
    from tests.director_fixtures import NET, director_with

    route = {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": "r"},
        "spec": {
            "modelName": "m",
            "loraAdapters": ["lora-x"],
            "rules": [{"targetModels": [{"modelServerName": "all"}]}],
        },
    }
    return director_with([route])


async def test_a_routed_adapter_goes_only_to_the_pods_that_have_it_loaded():
    d = adapter_route_director()
    set_models(d, {A0: {"m"}, A1: {"m", "lora-x"}, B0: {"m"}, B1: None})
    for _ in range(6):  # B1 has not been read yet: it may serve it, as without a route
        ctx = context(model="lora-x")
        (target,) = await d.handle(ctx)
        assert ctx.resolution is not None and ctx.resolution.adapter
        assert target.address in {A1, B1} and ctx.target_model == "lora-x"
    assert {e.address for e in d.eligibility.endpoints(ctx)} == {A1, B1}
    # the base model still goes everywhere the route sends it
    assert {e.address for e in d.eligibility.endpoints(context(model="m"))} == EVERYONE


async def test_a_routed_adapter_no_pod_has_loaded_is_503():
    d = adapter_route_director()
    set_models(d, {a: {"m"} for a in EVERYONE})
    assert await handle_status(d, context(model="lora-x")) == 503


async def test_flow_control_waits_for_room_on_the_endpoints_scheduling_may_use():
    """The pods of another ModelServer have room; the route's are saturated: the request
    waits, and goes to the route's pod once one has room."""
    import asyncio

    from infergw.epp.flowcontrol import FlowControlConfig

    d = port_8001_director(FlowControlConfig())
    for ep in d.datastore.endpoints():
        busy = ep.address in (A1, B1)
        ep.metrics.waiting, ep.metrics.updated_at = (10 if busy else 0), 1e18
    ctx = context()
    waiting = asyncio.create_task(d.handle(ctx))
    await asyncio.sleep(0.05)
    assert not waiting.done() and d.gate.queue.queued_requests == 1
    d.datastore.endpoint(B1).metrics.waiting = 0
    d.gate.notify()
    (target,) = await asyncio.wait_for(waiting, 2)
    assert target.address == B1 and ctx.targets == [B1]
    await d.gate.close()


async def test_a_routed_request_counts_its_routes_rewrite_decision_once():
    d = director_with(limited_route(inputTokensPerUnit=10_000))
    await d.handle(context(model="m"))
    await d.handle(context(model="m"))
    decision = {"model_name": "m", "target_model": "m", "model_rewrite_name": "limited"}
    assert sample(d, "inference_extension_model_rewrite_decisions_total", **decision) == 2
    assert sample(d, "llm_d_epp_model_rewrite_decisions_total", **decision) == 2
    plain = make_director()  # no route: no decision
    await plain.handle(context(model="m"))
    assert sample(plain, "inference_extension_model_rewrite_decisions_total", **decision) == 0
