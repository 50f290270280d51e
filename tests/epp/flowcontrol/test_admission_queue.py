"""The admission controller under real asyncio: ordering, limits, TTL, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from infergw.epp.flowcontrol import (
    AdmissionController,
    BandConfig,
    FlowControlConfig,
    FlowItem,
    Outcome,
)

# How long a test waits for an outcome it expects: ample on a loaded machine, and only
# spent when the outcome never comes (a failure).
WAIT = 10


class Pool:
    """A stand-in for the endpoints: `free` slots; saturated when none is left."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.checked: list[FlowItem] = []

    def saturated(self, item: FlowItem) -> bool:
        self.checked.append(item)
        return self.free <= 0


def make(pool: Pool, **kw) -> AdmissionController:
    kw.setdefault("recheck_interval", 10.0)  # tests drive dispatch with notify() unless stated
    return AdmissionController(FlowControlConfig(**kw), pool.saturated)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def admit_all(ctl: AdmissionController, pool: Pool, items: list[FlowItem], order: list):
    """Queue each item in its own task; an admitted item takes a pool slot, as a request would."""

    async def one(item: FlowItem):
        adm = await ctl.admit(item)
        if adm.admitted:
            pool.free -= 1
            order.append(item.request_id)
        return adm

    tasks = []
    for item in items:
        tasks.append(asyncio.create_task(one(item)))
        await settle()  # queue in this order
    return tasks


async def test_admits_at_once_when_the_pool_has_room() -> None:
    pool = Pool(free=1)
    ctl = make(pool)
    adm = await ctl.admit(FlowItem(flow_id="a", input_tokens=40))
    assert adm.admitted and adm.status is None and adm.waited == 0
    assert ctl.queued_requests == 0
    assert ctl.band_vtc(0).counter("a") == 40  # input charged at dispatch
    assert ctl.stats.dispatched == 1 and ctl.stats.dispatched_after_wait == 0


async def test_no_dispatch_while_saturated_then_dispatch_when_it_clears() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    task = asyncio.create_task(ctl.admit(FlowItem(flow_id="a", size_bytes=100)))
    await asyncio.sleep(0.05)
    ctl.notify()  # capacity "may" have freed, but the pool still says saturated
    await asyncio.sleep(0.05)
    assert not task.done()
    assert ctl.queued_requests == 1 and ctl.queued_bytes == 100
    pool.free = 1
    ctl.notify()
    adm = await asyncio.wait_for(task, WAIT)
    assert adm.admitted and adm.waited >= 0.09
    assert ctl.queued_requests == 0 and ctl.queued_bytes == 0
    assert ctl.stats.dispatched_after_wait == 1
    assert ctl.stats.wait_seconds_max >= 0.09
    await ctl.close()


async def test_periodic_recheck_dispatches_without_notify() -> None:
    pool = Pool(free=0)
    ctl = make(pool, recheck_interval=0.01)
    task = asyncio.create_task(ctl.admit(FlowItem()))
    await asyncio.sleep(0.03)
    assert not task.done()
    pool.free = 1  # metrics changed, nobody called notify()
    adm = await asyncio.wait_for(task, WAIT)
    assert adm.admitted
    await ctl.close()


async def test_strict_priority_a_high_item_overtakes_the_waiting_queue() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    order: list[str] = []
    lows = [FlowItem(flow_id="a", priority=0, request_id=f"low{i}") for i in range(3)]
    tasks = await admit_all(ctl, pool, lows, order)
    tasks += await admit_all(ctl, pool, [FlowItem(priority=5, request_id="high")], order)
    assert ctl.snapshot()["bands"][5]["requests"] == 1
    pool.free = 1
    ctl.notify()
    await settle()
    assert order == ["high"]  # one slot: it went to the higher band
    pool.free = 3
    ctl.notify()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == ["high", "low0", "low1", "low2"]  # FIFO within the flow
    await ctl.close()


async def test_a_newcomer_queues_behind_waiting_items_even_when_room_appears() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    order: list[str] = []
    tasks = await admit_all(ctl, pool, [FlowItem(request_id="first")], order)
    pool.free = 1  # room, but someone waits: the newcomer must not jump the queue
    tasks += await admit_all(ctl, pool, [FlowItem(request_id="second")], order)
    await asyncio.wait_for(tasks[0], WAIT)
    assert order == ["first"]
    pool.free = 1
    ctl.notify()
    await asyncio.wait_for(tasks[1], WAIT)
    assert order == ["first", "second"]
    await ctl.close()


async def test_fairness_within_a_band_alternates_flows_instead_of_fifo() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    order: list[str] = []
    items = [FlowItem(flow_id="a", input_tokens=100, request_id=f"a{i}") for i in range(3)]
    items += [FlowItem(flow_id="b", input_tokens=100, request_id=f"b{i}") for i in range(3)]
    tasks = await admit_all(ctl, pool, items, order)
    pool.free = 6
    ctl.notify()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]
    await ctl.close()


async def test_a_cheap_flow_gets_more_requests_through_than_an_expensive_one() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    order: list[str] = []
    items = [FlowItem(flow_id="big", input_tokens=300, request_id="big") for _ in range(3)]
    items += [FlowItem(flow_id="small", input_tokens=100, request_id="small") for _ in range(4)]
    tasks = await admit_all(ctl, pool, items, order)
    pool.free = 4
    ctl.notify()
    await settle()
    # big (300) → small ×3 (100, 200, 300) → then a tie at 300 goes to big, backlogged first
    assert order == ["big", "small", "small", "small"]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_output_tokens_count_towards_fairness() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    order: list[str] = []
    items = [
        FlowItem(flow_id=f, input_tokens=10, request_id=f"{f}{i}") for i in (0, 1) for f in "ab"
    ]
    tasks = await admit_all(ctl, pool, items, order)
    pool.free = 2
    ctl.notify()
    await settle()
    assert order == ["a0", "b0"]
    ctl.charge_output(items[0], 50)  # a0's answer was long
    ctl.charge_output(items[0], 0)
    assert ctl.band_vtc(0).counter("a") == 10 + 2 * 50
    pool.free = 1
    ctl.notify()
    await settle()
    assert order == ["a0", "b0", "b1"]  # a1 queued first, but b was served less
    tasks[2].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_sheddable_requests_never_wait() -> None:
    pool = Pool(free=0)
    ctl = make(pool, retry_after_min=2)
    adm = await ctl.admit(FlowItem(priority=-1))
    assert adm.outcome is Outcome.REJECTED_SHEDDABLE
    assert adm.status == 429 and adm.retry_after == 2
    assert ctl.queued_requests == 0
    pool.free = 1
    assert (await ctl.admit(FlowItem(priority=-1))).admitted  # room and nobody waiting
    pool.free = 0
    waiting = asyncio.create_task(ctl.admit(FlowItem(priority=0)))
    await settle()
    pool.free = 5  # room, but a request waits: sheddable work does not cut in
    assert (await ctl.admit(FlowItem(priority=-3))).status == 429
    ctl.notify()
    assert (await asyncio.wait_for(waiting, WAIT)).admitted
    assert ctl.stats.rejected == {"rejected_sheddable": 2}
    await ctl.close()


async def test_a_full_queue_rejects_the_newcomer_with_429() -> None:
    pool = Pool(free=0)
    ctl = make(pool, max_requests=2, retry_after_min=1, retry_after_max=30)
    order: list[str] = []
    tasks = await admit_all(ctl, pool, [FlowItem(request_id=str(i)) for i in range(2)], order)
    adm = await ctl.admit(FlowItem(priority=9, request_id="late"))  # even a higher priority
    assert adm.outcome is Outcome.REJECTED_CAPACITY and adm.status == 429
    assert "limit of 2 requests" in adm.message
    assert adm.retry_after == 1  # no dispatch rate known yet: the minimum
    assert ctl.queued_requests == 2  # nobody was displaced
    pool.free = 2
    ctl.notify()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == ["0", "1"]
    await ctl.close()


async def test_band_request_limit_applies_to_its_band_only() -> None:
    pool = Pool(free=0)
    ctl = make(pool, bands=(BandConfig(priority=5, max_requests=1),))
    tasks = [asyncio.create_task(ctl.admit(FlowItem(priority=5)))]
    await settle()
    adm = await ctl.admit(FlowItem(priority=5))
    assert adm.status == 429 and "priority band 5" in adm.message
    tasks.append(asyncio.create_task(ctl.admit(FlowItem(priority=0))))
    await settle()
    assert ctl.queued_requests == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_byte_limits_overall_and_per_band() -> None:
    pool = Pool(free=0)
    ctl = make(pool, max_bytes=1000, default_band=BandConfig(max_bytes=600))
    order: list[str] = []
    tasks = await admit_all(ctl, pool, [FlowItem(size_bytes=500, request_id="first")], order)
    adm = await ctl.admit(FlowItem(size_bytes=200))  # 700 > the band's 600
    assert adm.status == 429 and "priority band 0 cannot take 200 more bytes" in adm.message
    tasks += await admit_all(
        ctl, pool, [FlowItem(priority=1, size_bytes=400, request_id="p1")], order
    )
    assert ctl.queued_bytes == 900
    adm = await ctl.admit(FlowItem(priority=2, size_bytes=200))  # 1100 > the overall 1000
    assert adm.status == 429 and "the queue cannot take 200 more bytes" in adm.message
    pool.free = 1
    ctl.notify()
    await asyncio.wait_for(tasks[1], WAIT)  # the higher band went first and freed its bytes
    assert order == ["p1"] and ctl.queued_bytes == 500
    tasks += await admit_all(ctl, pool, [FlowItem(priority=2, size_bytes=200)], order)
    assert ctl.queued_bytes == 700
    assert ctl.stats.rejected == {"rejected_capacity": 2}
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_ttl_expiry_answers_503_and_leaves_nothing_behind() -> None:
    pool = Pool(free=0)
    # TTLs far apart: on a loaded machine the loop may stall past both before it wakes.
    ctl = make(pool, default_request_ttl=0.3)
    own = asyncio.create_task(ctl.admit(FlowItem(flow_id="a", ttl=0.02)))
    default = asyncio.create_task(ctl.admit(FlowItem(flow_id="b")))
    forever = asyncio.create_task(ctl.admit(FlowItem(flow_id="c", ttl=0)))
    adm = await asyncio.wait_for(own, WAIT)
    assert adm.outcome is Outcome.EVICTED_TTL and adm.status == 503
    assert adm.waited >= 0.02 and "TTL of 0.02s" in adm.message
    assert not default.done()
    adm = await asyncio.wait_for(default, WAIT)
    assert adm.status == 503 and adm.waited >= 0.3
    await asyncio.sleep(0.05)
    assert not forever.done()  # ttl 0: waits until dispatched or withdrawn
    assert ctl.queued_requests == 1
    assert ctl.band_vtc(0).active == ["c"]
    assert ctl.stats.rejected == {"evicted_ttl": 2}
    forever.cancel()
    await asyncio.gather(forever, return_exceptions=True)
    await ctl.close()


async def test_an_item_already_past_its_ttl_is_rejected_when_it_would_wait() -> None:
    import time

    pool = Pool(free=0)
    ctl = make(pool)
    stale = FlowItem(enqueued_at=time.monotonic() - 5, ttl=1)
    adm = await asyncio.wait_for(ctl.admit(stale), WAIT)
    assert adm.status == 503
    await ctl.close()


async def test_cancellation_leaves_the_queue_at_once() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    item = FlowItem(flow_id="a", size_bytes=64)
    task = asyncio.create_task(ctl.admit(item))
    await settle()
    assert ctl.queued_requests == 1 and item.timer is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctl.queued_requests == 0 and ctl.queued_bytes == 0
    assert item.timer is None  # its TTL timer is gone too
    assert ctl.snapshot()["bands"][0]["flows"] == {}
    assert ctl.band_vtc(0).active == []
    assert ctl.stats.cancelled_queued == 1
    await ctl.close()


async def test_client_timeouts_leak_nothing() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    for i in range(50):
        item = FlowItem(flow_id=f"f{i % 5}", size_bytes=10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ctl.admit(item), 0.001)
    assert ctl.queued_requests == 0 and ctl.queued_bytes == 0
    assert all(not b["flows"] for b in ctl.snapshot()["bands"].values())
    assert ctl.stats.cancelled_queued == 50
    await ctl.close()


async def test_cancelled_between_dispatch_and_resume_is_refunded() -> None:
    pool = Pool(free=0)
    tasks: list[asyncio.Task] = []

    def cancel_right_after_dispatch(item: FlowItem, waited: float) -> None:
        tasks[0].cancel()  # the client leaves in the same instant it is admitted

    ctl = AdmissionController(
        FlowControlConfig(recheck_interval=10),
        pool.saturated,
        observe_wait=cancel_right_after_dispatch,
    )
    tasks.append(asyncio.create_task(ctl.admit(FlowItem(flow_id="a", input_tokens=70))))
    await settle()
    pool.free = 1
    await ctl.dispatch_ready()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert ctl.band_vtc(0).counter("a") == 0  # never ran: no charge
    assert ctl.stats.cancelled_dispatched == 1
    await ctl.close()


async def test_close_answers_waiting_requests_with_503() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    task = asyncio.create_task(ctl.admit(FlowItem()))
    await settle()
    await ctl.close()
    adm = await asyncio.wait_for(task, WAIT)
    assert adm.outcome is Outcome.REJECTED_SHUTDOWN and adm.status == 503
    assert (await ctl.admit(FlowItem())).status == 503
    assert ctl.queued_requests == 0


async def test_a_failing_saturation_check_holds_the_queue_without_killing_it() -> None:
    mode = {"now": "saturated"}

    def saturated(item: FlowItem) -> bool:
        if mode["now"] == "broken":
            raise RuntimeError("metrics gone")
        return mode["now"] == "saturated"

    ctl = AdmissionController(FlowControlConfig(recheck_interval=0.01), saturated)
    task = asyncio.create_task(ctl.admit(FlowItem()))
    await settle()
    mode["now"] = "broken"
    ctl.notify()
    await asyncio.sleep(0.05)  # several failed re-checks
    assert not task.done() and ctl.queued_requests == 1
    mode["now"] = "room"
    assert (await asyncio.wait_for(task, WAIT)).admitted  # the dispatcher survived
    mode["now"] = "broken"
    with pytest.raises(RuntimeError):  # on the fast path the caller sees its own bug
        await ctl.admit(FlowItem())
    assert ctl.queued_requests == 0
    await ctl.close()


async def test_snapshot_reports_queues_per_band_and_flow() -> None:
    pool = Pool(free=0)
    ctl = make(pool)
    items = [
        FlowItem(flow_id="a", size_bytes=10),
        FlowItem(flow_id="a", size_bytes=10),
        FlowItem(flow_id="b", priority=3, size_bytes=5),
    ]
    tasks = [asyncio.create_task(ctl.admit(i)) for i in items]
    await settle()
    snap = ctl.snapshot()
    assert snap["queued_requests"] == 3 and snap["queued_bytes"] == 25
    assert snap["bands"][0]["flows"] == {"a": 2}
    assert snap["bands"][3] == {
        "requests": 1,
        "bytes": 5,
        "flows": {"b": 1},
        "counters": {"b": 0.0},
    }
    assert list(snap["bands"]) == [3, 0]  # highest priority first
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_retry_after_follows_the_recent_dispatch_rate() -> None:
    pool = Pool(free=0)
    ctl = make(pool, max_requests=4, retry_after_min=1, retry_after_max=120)
    # Four requests dispatched over about 0.3 s: ~10/s.
    for _ in range(4):
        pool.free = 1
        await ctl.admit(FlowItem())
        await asyncio.sleep(0.1)
    pool.free = 0
    tasks = [asyncio.create_task(ctl.admit(FlowItem())) for _ in range(4)]
    await settle()
    adm = await ctl.admit(FlowItem())
    assert adm.status == 429
    assert 1 <= adm.retry_after <= 2  # 4 ahead at ~10/s, rounded up, at least the minimum
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctl.close()


async def test_expected_output_is_charged_at_dispatch_and_settled_at_the_end():
    ctl = make(Pool(free=5))
    vtc = ctl.band_vtc(0)
    short = FlowItem(flow_id="a", input_tokens=10, expected_output=50)
    assert (await ctl.admit(short)).admitted
    assert vtc.service("a") == 10 + 2 * 50  # output weighs 2: charged before any arrives
    ctl.charge_output(short, 30)  # covered by the estimate: nothing more
    assert vtc.service("a") == 110
    ctl.settle(short)  # it ended with 30: the 20 not produced come back
    assert vtc.service("a") == 10 + 2 * 30
    long = FlowItem(flow_id="b", input_tokens=10, expected_output=50)
    await ctl.admit(long)
    ctl.charge_output(long, 40)
    ctl.charge_output(long, 40)  # 80 in all: the 30 beyond the estimate are charged
    ctl.settle(long)
    assert vtc.service("b") == 10 + 2 * 80
    await ctl.close()


async def test_a_saturated_head_does_not_hold_requests_for_other_endpoints():
    busy = {"llama": True, "qwen": False}
    ctl = AdmissionController(
        FlowControlConfig(recheck_interval=10.0), lambda item: busy[item.payload]
    )
    llama = asyncio.create_task(ctl.admit(FlowItem(flow_id="a", payload="llama")))
    await settle()
    qwen = asyncio.create_task(ctl.admit(FlowItem(flow_id="b", payload="qwen")))
    await asyncio.wait_for(qwen, WAIT)  # its own endpoints have room: it goes at once
    assert qwen.result().admitted and not llama.done()
    busy["llama"] = False
    ctl.notify()
    assert (await asyncio.wait_for(llama, WAIT)).admitted
    await ctl.close()
