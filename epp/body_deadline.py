"""A bound on the request body phase: while a request's body is open (its headers came
without end of stream, its end not yet), a gap longer than the timeout between two of the
stream's messages is answered 408.

Why here as well as Envoy's `request_timeout` (300 s for the whole request, which Envoy stops
at the request's end from the client, so the picker's queue and the answer are not counted):
that bounds a body's total time, too long to wait on one that stopped; a client that sends its
headers and then stops its body would hold its connection, Envoy's buffers and an ext_proc
stream that long, and with no proxy timeout at all, for ever (slowloris). The idle timeouts
cannot serve: they count the queue's silence too. nginx's `client_body_timeout` is the same
bound, with the same default.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

from infergw.epp.errors import PickerError

DEFAULT_REQUEST_BODY_TIMEOUT = 60.0  # seconds; nginx's client_body_timeout default

T = TypeVar("T")


class BodyStalled(PickerError):
    """No part of a request's body came for longer than the bound."""

    def __init__(self, timeout: float, path: str, received: int) -> None:
        super().__init__(
            408,
            f"the request body of {path} stalled: nothing came for {timeout:g} s after "
            f"{received} bytes",
        )
        self.received = received


class BodyState(Protocol):
    """What a stream (the picker's, the router's) says of its request body."""

    headers: dict[str, str]
    body_open: bool  # the headers came without end of stream; the body's end not yet
    body: object  # its BodyAccumulator: len() is the bytes received


def next_message(messages: AsyncIterator[T], stream: BodyState, timeout: float) -> Awaitable[T]:
    """The stream's next message: bounded by `timeout` while its body is open (0: never),
    else the iterator's own awaitable, so answer chunks pay no extra frame."""
    if stream.body_open and timeout > 0:
        path = stream.headers.get(":path", "?")
        return next_body_message(messages, timeout, path, len(stream.body))
    return messages.__anext__()


async def next_body_message(
    messages: AsyncIterator[T], seconds: float, path: str, received: int
) -> T:
    """The stream's next message, within `seconds` (raises BodyStalled past it, and
    StopAsyncIteration at the stream's end). A timer handle, not a task: only streams whose
    body is open pay for it."""
    try:
        async with asyncio.timeout(seconds):
            return await messages.__anext__()
    except TimeoutError:
        raise BodyStalled(seconds, path, received) from None
