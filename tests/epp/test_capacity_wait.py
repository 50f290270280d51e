"""Scale from zero in the picker: a request with no ready endpoint is held (not answered 503
at once) until a pod is ready, then scheduled; past the TTL it gets 503 with Retry-After and
an OpenAI-style body; a client that leaves is dropped and counted; the held requests are the
demand gauge the autoscaler reads; they leave by priority."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from infergw.api.names import PICKER_DEMAND_METRIC
from infergw.epp.capacity_wait import (
    OUTCOMES_METRIC,
    CapacityWait,
    CapacityWaitCollector,
)
from infergw.epp.director import Director
from infergw.epp.errors import NoCapacity, PickerError
from infergw.epp.flowcontrol import FlowControlConfig, FlowItem
from tests.director_fixtures import (
    NET,
    cold_director,
    context,
    pod,
)

ROUTE = {
    "apiVersion": NET,
    "kind": "ModelRoute",
    "metadata": {"name": "r"},
    "spec": {"modelName": "m", "rules": [{"targetModels": [{"modelServerName": "all"}]}]},
}


def gauge(d: Director, metric: str = PICKER_DEMAND_METRIC, **labels) -> float:
    total = 0.0
    for family in d.metrics.registry.collect():
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def until(check, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def scale_up(d: Director) -> None:
    d.datastore.replace_pods([pod("a", "10.0.0.1")])
    d.gate.notify()  # as the scraper's refresh does


@pytest.mark.parametrize("routes", [(), (ROUTE,)], ids=["pool", "modelroute"])
async def test_a_cold_request_waits_for_a_pod_and_is_then_scheduled(routes):
    d = cold_director(routes=routes)
    task = asyncio.create_task(d.handle(context()))
    await until(lambda: gauge(d) == 1)
    assert gauge(d, name="pool", model_name="m") == 1  # the demand, per pool and model
    await asyncio.sleep(0.1)
    assert not task.done()  # held, not answered
    scale_up(d)
    targets = await asyncio.wait_for(task, 5)
    assert targets[0].address.startswith("10.0.0.1:")
    assert gauge(d) == 0
    assert gauge(d, OUTCOMES_METRIC + "_total", outcome="served") == 1


async def test_concurrent_cold_requests_are_all_served():
    d = cold_director(routes=(ROUTE,))
    tasks = [asyncio.create_task(d.handle(context())) for _ in range(8)]
    await until(lambda: gauge(d) == 8)
    scale_up(d)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(r[0].address.startswith("10.0.0.1:") for r in results)
    assert gauge(d) == 0


async def test_past_the_ttl_a_held_request_gets_503_with_retry_after():
    d = cold_director(ttl=0.2, routes=(ROUTE,))
    with pytest.raises(PickerError) as err:
        await asyncio.wait_for(d.handle(context()), 5)
    e = err.value
    assert e.status == 503
    assert int(e.headers["retry-after"]) >= 1
    body = e.body()["error"]
    assert "no ready pod for model 'm'" in body["message"] and "0.2s" in body["message"]
    assert body["type"] == "ServiceUnavailable" and body["code"] == 503
    assert gauge(d) == 0
    assert gauge(d, OUTCOMES_METRIC + "_total", outcome="expired") == 1


async def test_a_ttl_of_zero_answers_at_once_as_before():
    d = cold_director(ttl=0)
    with pytest.raises(PickerError) as err:
        await asyncio.wait_for(d.handle(context()), 1)
    assert err.value.status == 503 and isinstance(err.value, NoCapacity)


async def test_a_client_that_leaves_while_held_is_dropped_and_counted():
    d = cold_director()
    task = asyncio.create_task(d.handle(context()))
    await until(lambda: gauge(d) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gauge(d) == 0
    assert gauge(d, OUTCOMES_METRIC + "_total", outcome="cancelled") == 1
    scale_up(d)  # nothing left to release: the next request goes at once
    assert (await d.handle(context()))[0].address.startswith("10.0.0.1:")


async def test_the_held_queue_keeps_flow_controls_limits():
    d = cold_director(flow_control=FlowControlConfig(max_requests=1))
    first = asyncio.create_task(d.handle(context()))
    await until(lambda: gauge(d) == 1)
    with pytest.raises(PickerError) as err:
        await d.handle(context())
    assert err.value.status == 429 and "retry-after" in err.value.headers
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_with_flow_control_a_released_request_waits_for_fresh_metrics_then_goes():
    d = cold_director(flow_control=FlowControlConfig())
    task = asyncio.create_task(d.handle(context()))
    await until(lambda: gauge(d) == 1)
    d.datastore.replace_pods([pod("a", "10.0.0.1")])
    for ep in d.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 0, 1e18  # scraped: room
    d.gate.notify()
    assert (await asyncio.wait_for(task, 5))[0].address.startswith("10.0.0.1:")


async def test_held_requests_leave_by_priority():
    wait = CapacityWait(ttl=30)
    ready = False
    order: list[int] = []

    async def one(priority: int) -> None:
        ctx = context()
        item = FlowItem(priority=priority)
        await wait.hold(ctx, item, lambda _ctx: ready, NoCapacity("cold"))
        order.append(priority)

    tasks = []
    for p in (0, 5, 1, 10):
        tasks.append(asyncio.create_task(one(p)))
        await asyncio.sleep(0.01)
    await until(lambda: wait.queue.queued_requests == 4)
    ready = True
    wait.notify()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [10, 5, 1, 0]
    await wait.close()


def test_the_collector_bounds_model_names():
    wait = CapacityWait(ttl=30)
    registry = CollectorRegistry()
    registry.register(CapacityWaitCollector(wait, lambda name: "other"))
    assert {f.name for f in registry.collect()} == {PICKER_DEMAND_METRIC, OUTCOMES_METRIC}
