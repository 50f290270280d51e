"""A thread that runs blocking calls for the event loop, one at a time, in arrival order.

It replaces a one-thread ThreadPoolExecutor on the request path: `run_in_executor` costs the
loop a concurrent.futures.Future, a condition variable, a chained asyncio future and one
wake-up per call. Here a call is a tuple on a SimpleQueue (a C queue, no lock of ours) and
the thread hands back every call it finished since it last woke the loop in one callback, so
under load the loop wakes once per batch rather than once per prompt.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("epp.worker_lane")

T = TypeVar("T")

# Calls finished before the loop is woken: enough to coalesce a burst, few enough that the
# first call of a batch does not wait long for the last (small prompts take ~0.1 ms each).
MAX_BATCH = 16

_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future, asyncio.AbstractEventLoop]
_Done = tuple[asyncio.Future, bool, Any]  # (future, ok, result or exception)


class WorkerLane:
    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the lane's thread; its result, or its exception raised here."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._ensure_thread()
        self._calls.put((fn, args, fut, loop))
        return await fut

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                t = threading.Thread(target=self._work, name=self.name, daemon=True)
                t.start()
                self._thread = t

    def _work(self) -> None:
        calls = self._calls
        while True:
            done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
            call: _Call | None = calls.get()
            while call is not None:
                fn, args, fut, loop = call
                try:
                    outcome: _Done = (fut, True, fn(*args))
                except BaseException as exc:  # handed to the awaiting coroutine
                    outcome = (fut, False, exc)
                done.setdefault(loop, []).append(outcome)
                call = None
                if sum(map(len, done.values())) < MAX_BATCH:
                    try:
                        call = calls.get_nowait()
                    except queue.Empty:
                        pass
            for loop, outcomes in done.items():
                try:
                    loop.call_soon_threadsafe(_settle, outcomes)
                except RuntimeError:  # that loop is closed: nobody awaits these any more
                    log.debug("%s: a finished call's loop is closed", self.name)


def _settle(outcomes: list[_Done]) -> None:
    for fut, ok, value in outcomes:
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
