"""redis-py's RESP3 parser with a bound on the size of one reply.

The parser reads a reply to its end without yielding while the data is already buffered,
so the per-call timeout cannot cut it short: whatever answers on Redis's address (a proxy,
another server, a fault) and sends an array of 300k elements held the picker's event loop,
and every request, for most of a second per call. The bucket script's replies are a few
dozen bytes; one longer than MAX_REPLY_BYTES is refused as it is read (a ConnectionError,
so the connection is dropped and the limiter fails open or closed as configured).
Another user with larger replies (the shared KV index's lookups) takes a class with its own
bound from `bounded_parser`.
"""

from __future__ import annotations

from typing import Any

from redis._parsers import _AsyncRESP3Parser
from redis.exceptions import ConnectionError as RedisConnectionError

# Far above any reply the limiter's commands get (HELLO's map is the largest, ~200 bytes).
MAX_REPLY_BYTES = 16 * 1024


class ReplyTooLarge(RedisConnectionError):
    pass


class BoundedRESP3Parser(_AsyncRESP3Parser):
    max_reply_bytes = MAX_REPLY_BYTES

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)
        self._reply_bytes = 0

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        self._reply_bytes = 0
        return await super().read_response(*args, **kwargs)

    def _count(self, n: int) -> None:
        self._reply_bytes += n
        if self._reply_bytes > self.max_reply_bytes:
            raise ReplyTooLarge(f"a reply longer than {self.max_reply_bytes} bytes")

    async def _read(self, length: int) -> bytes:
        self._count(length + 2)  # before reading: a declared length is refused unread
        return await super()._read(length)

    async def _readline(self) -> bytes:
        line = await super()._readline()
        self._count(len(line) + 2)
        return line


def bounded_parser(max_reply_bytes: int) -> type[BoundedRESP3Parser]:
    """The parser class refusing replies longer than `max_reply_bytes` (redis-py takes a
    class, not an instance)."""
    if max_reply_bytes == MAX_REPLY_BYTES:
        return BoundedRESP3Parser
    if max_reply_bytes < 1024:
        raise ValueError("max_reply_bytes must be at least 1024 (HELLO's reply must fit)")
    return type("BoundedRESP3Parser", (BoundedRESP3Parser,), {"max_reply_bytes": max_reply_bytes})
