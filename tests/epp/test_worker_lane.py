"""The worker lane: calls run on its thread in order, results and exceptions come back to the
awaiting coroutine, bursts are answered, and a cancelled caller does not stop the lane."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from infergw.epp.worker_lane import MAX_BATCH, WorkerLane


def test_a_call_runs_on_the_lane_thread_and_returns_its_result() -> None:
    lane = WorkerLane("test-lane")

    async def main() -> tuple[str, int]:
        return await lane.run(lambda a, b: (threading.current_thread().name, a + b), 2, 3)

    name, total = asyncio.run(main())
    assert name == "test-lane"
    assert total == 5


def test_an_exception_is_raised_in_the_caller_and_the_lane_goes_on() -> None:
    lane = WorkerLane("test-lane-errors")

    def boom() -> None:
        raise ValueError("bad prompt")

    async def main() -> int:
        with pytest.raises(ValueError, match="bad prompt"):
            await lane.run(boom)
        return await lane.run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_a_burst_larger_than_a_batch_is_answered_in_arrival_order() -> None:
    lane = WorkerLane("test-lane-burst")
    order: list[int] = []

    def work(i: int) -> int:
        order.append(i)
        time.sleep(0.0005)
        return i * i

    async def main() -> list[int]:
        return await asyncio.gather(*(lane.run(work, i) for i in range(5 * MAX_BATCH)))

    results = asyncio.run(main())
    assert results == [i * i for i in range(5 * MAX_BATCH)]
    assert order == list(range(5 * MAX_BATCH))


def test_a_cancelled_caller_leaves_the_lane_working() -> None:
    lane = WorkerLane("test-lane-cancel")
    release = threading.Event()

    async def main() -> int:
        slow = asyncio.ensure_future(lane.run(release.wait, 5))
        await asyncio.sleep(0.01)
        slow.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return await lane.run(lambda: 11)

    assert asyncio.run(main()) == 11


def test_two_event_loops_on_two_threads_share_one_lane() -> None:
    lane = WorkerLane("test-lane-loops")
    results: dict[str, list[int]] = {}

    def loop_thread(tag: str, base: int) -> None:
        async def main() -> list[int]:
            return await asyncio.gather(*(lane.run(lambda i=i: base + i) for i in range(50)))

        results[tag] = asyncio.run(main())

    threads = [
        threading.Thread(target=loop_thread, args=(t, b)) for t, b in (("a", 0), ("b", 1000))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results["a"] == list(range(50))
    assert results["b"] == [1000 + i for i in range(50)]
