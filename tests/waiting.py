"""Polling until a condition holds: one helper for threads, one for coroutines.

Both return the first truthy value `check()` gave, and fail the test with `what` when
`within` seconds pass first.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.05  # short against every wait in the suite, long enough not to spin a core


def wait_for(
    check: Callable[[], T],
    what: str = "the condition",
    *,
    within: float = 10.0,
    interval: float = INTERVAL,
    alive: Iterable[subprocess.Popen] = (),
) -> T:
    """Call `check` until it returns something truthy; processes in `alive` must not exit
    meanwhile (a crashed server would otherwise only show as a timeout)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        for proc in alive:
            assert proc.poll() is None, f"process exited with {proc.returncode} waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {within:g}s waiting for {what}"
        time.sleep(interval)


async def wait_for_async(
    check: Callable[[], T | Awaitable[T]],
    what: str = "the condition",
    *,
    within: float = 10.0,
    interval: float = INTERVAL,
) -> T:
    """As `wait_for`, without blocking the loop; `check` may be a plain or an async function."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {within:g}s waiting for {what}"
        await asyncio.sleep(interval)
