"""Tokenizing off the event loop.

A prompt of megabytes takes seconds to encode, and a body of millions of token ids seconds to
parse; on the event loop that stalls /health and the pod leaves the pool. vLLM tokenizes off
its loop too. Work is split by size: small requests have a thread of their own, so a huge one
never queues a health-check-sized one behind it, and one thread for large work bounds the
memory encoding takes (each text is capped in prompts.py) to one text at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

# A request body up to this size is small work: encoding it takes well under a millisecond.
SMALL_WORK_BYTES = 64 * 1024


class TokenizerThreads:
    def __init__(self) -> None:
        self._small = ThreadPoolExecutor(1, thread_name_prefix="tokenize-small")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="tokenize-large")

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the thread for work of this size (the request body's bytes)."""
        pool = self._small if size <= SMALL_WORK_BYTES else self._large
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    def close(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
