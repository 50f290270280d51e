"""The pods' pages fetched on a thread of their own, so that scraping's CPU can be told apart.

The picker's requests and its scrapes shared one event loop, and its CPU could only be
counted as a whole: a benchmark could not say how much of a request's cost was scraping
(issue 15). Here the HTTP side of scraping (connections, requests, the responses' parsing,
reading the bodies) runs on one thread with its own loop; `cpu_seconds()` reads that thread's
CPU clock from anywhere. What the picker does with a page (decoding, finding the wanted lines)
stays on the main loop, where the datastore lives, and is timed there (MetricsScraper).
It also keeps the socket work of 160 pages a second out of the loop every request shares.

A pod's answers are untrusted input: redirects are not followed (the numbers must be the
pod's own, not those of whatever address it names), bodies are read up to a cap, and only
uncompressed bodies are asked for (a few KiB of gzip can inflate past any cap before we see
it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import aiohttp


class ScrapeError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


TOO_LARGE = "too_large"


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or ScrapeError(TOO_LARGE) as soon as it passes `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ScrapeError(TOO_LARGE, f"body of {resp.content_length} bytes > {limit}")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ScrapeError(TOO_LARGE, f"body longer than {limit} bytes")
    return bytes(body)


class PageFetcher:
    """GET with a byte cap, run on the fetcher's thread; awaited from any other loop."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        self._clock: int | None = None  # the thread's CPU clock id
        self._cpu_at_stop = 0.0

    def start(self) -> None:
        ready = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="epp-scrape", daemon=True
        )
        self._thread.start()
        ready.result(timeout=10)

    def _run(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._clock = time.pthread_getcpuclockid(threading.get_ident())
        self._session = loop.run_until_complete(self._open())
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(self._session.close())
            loop.close()

    async def _open(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"Accept-Encoding": "identity"},
            auto_decompress=False,
        )

    async def get(self, url: str, limit: int) -> tuple[int, bytes]:
        """(status, body up to `limit` bytes; empty unless 200). Raises what aiohttp raises
        (unreachable, timeout) and ScrapeError(TOO_LARGE); cancelling the caller cancels it."""
        assert self._loop is not None, "PageFetcher.start() first"
        future = asyncio.run_coroutine_threadsafe(self._get(url, limit), self._loop)
        return await asyncio.wrap_future(future)

    async def _get(self, url: str, limit: int) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                return resp.status, b""
            return 200, await read_capped(resp, limit)

    def cpu_seconds(self) -> float:
        """CPU the fetcher's thread has used since it started."""
        if self._clock is None or self._thread is None or not self._thread.is_alive():
            return self._cpu_at_stop
        try:
            return time.clock_gettime(self._clock)
        except OSError:  # the thread ended between the check and the read
            return self._cpu_at_stop

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._cpu_at_stop = self.cpu_seconds()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = None
