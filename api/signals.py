"""Waiting for the signals that stop a server process (picker, body-based router, P/D sidecar)."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_signal(ready: asyncio.Event | None = None) -> None:
    """Until SIGINT or SIGTERM; `ready` is set once the handlers are in place."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    if ready is not None:
        ready.set()
    await stop_requested.wait()
