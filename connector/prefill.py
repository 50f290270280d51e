"""The prefill leg: one blocking request to a prefill pod, retried on the next prefiller of the
header when a pod is unreachable, overloaded (502/503/504) or too slow. The whole leg, retries
and backoffs included, ends within --prefill-timeout, and a prefiller that could not be
connected to is not tried again by the same request: a dead prefill pod costs a request one
failed connect, then the local engine serves it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from infergw.api import tracing
from infergw.connector.upstream import Exchange, LegError, describe, error_text

log = logging.getLogger("connector.prefill")

RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(slots=True)
class PrefillReply:
    host: str  # the prefiller that answered
    body: dict  # its JSON response
    attempts: int


class PrefillAttemptFailed(Exception):
    def __init__(
        self,
        host: str,
        reason: str,
        text: str,
        *,
        retryable: bool,
        status: int | None = None,
        unreachable: bool = False,
        connect_failed: bool = False,
    ) -> None:
        super().__init__(f"{host} {text}")
        self.host = host
        self.reason = reason  # metric label
        self.text = text
        self.retryable = retryable
        self.status = status
        # The prefiller is gone or refuses work (connection failed or dropped, 502/503/504),
        # as opposed to slow (a timeout) or rejecting this request: the local engine may serve it.
        self.unreachable = unreachable or status in RETRY_STATUSES
        # No connection could be opened at all: trying this prefiller again would only wait.
        self.connect_failed = connect_failed


def connection_lost(exc: BaseException) -> bool:
    """A connection that could not be opened (refused, reset, no route, connect timeout) or
    that broke before the answer was whole; not a prefiller that is merely slow."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return True
    if isinstance(exc, aiohttp.ServerTimeoutError):  # a read timeout: slow, not gone
        return False
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError)


def connect_failed(exc: BaseException) -> bool:
    """The connection could not be opened (refused, no route, connect timeout), as opposed to
    one that broke later: a pooled keep-alive connection the prefiller had closed is worth a
    new one, a prefiller that refuses connections is not worth asking again at once."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def prefill_timeout(ex: Exchange, left: float) -> aiohttp.ClientTimeout:
    """One attempt's timeout: what is left of the leg's --prefill-timeout."""
    connect = min(ex.opts.connect_timeout, left)
    return aiohttp.ClientTimeout(total=left, connect=connect, sock_connect=connect)


async def attempt_prefill(ex: Exchange, host: str, body: bytes, left: float) -> dict:
    """One prefill request to `host`, given `left` seconds; its JSON object, or
    PrefillAttemptFailed."""
    try:
        async with ex.session.post(
            ex.prefill_url(host),
            data=body,
            headers=ex.leg_headers(),
            timeout=prefill_timeout(ex, left),
            allow_redirects=False,
        ) as resp:
            raw = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        reason, text = describe(exc)
        if text == "timed out":
            text = (
                f"did not answer within the leg's {ex.opts.prefill_timeout:g}s (--prefill-timeout)"
            )
        raise PrefillAttemptFailed(
            host,
            reason,
            text,
            retryable=True,
            unreachable=connection_lost(exc),
            connect_failed=connect_failed(exc),
        ) from exc
    if status in RETRY_STATUSES:
        text = f"answered {status}: {error_text(raw)}"
        raise PrefillAttemptFailed(host, f"status_{status}", text, retryable=True, status=status)
    if not 200 <= status < 300:
        text = f"answered {status}: {error_text(raw)}"
        raise PrefillAttemptFailed(host, f"status_{status}", text, retryable=False, status=status)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        text = f"answered {status} with a body that is not a JSON object ({len(raw)} bytes)"
        raise PrefillAttemptFailed(host, "invalid_response", text, retryable=False)
    return doc


def attempt_error(failed: PrefillAttemptFailed) -> LegError:
    """A prefill failure we do not retry: the prefiller's 4xx stays a 4xx (the request is at
    fault), anything else is a 502."""
    status = failed.status if failed.status and 400 <= failed.status < 500 else 502
    return LegError(status, f"prefill leg failed: prefiller {failed}", "prefill_rejected")


def exhausted_error(failures: list[PrefillAttemptFailed]) -> LegError:
    """Every attempt failed with something retryable: 503 if every prefiller said it was
    unavailable, 502 otherwise. When no attempt reached a working prefiller (all connection
    failures or 502/503/504, no timeout), the local engine may serve the request instead."""
    status = 503 if all(f.status == 503 for f in failures) else 502
    tried = "; ".join(str(f) for f in failures)
    n = len(failures)
    return LegError(
        status,
        f"prefill leg failed: no prefiller succeeded after {n} attempt{'s' * (n > 1)} ({tried})",
        "prefill_exhausted",
        local_fallback=failures[-1].reason
        if failures and all(f.unreachable for f in failures)
        else None,
    )


class PrefillAttempts:
    """The attempts of one prefill leg: 1 + --prefill-retries, each on the next prefiller of
    the header, going round again after a short backoff, all within --prefill-timeout of the
    first. A prefiller that could not be connected to is skipped from then on: without it, a
    dead pod named alone in the header took every attempt and backoff (and, where its
    address drops packets, --connect-timeout each) before the local engine could serve."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.deadline = time.monotonic() + ex.opts.prefill_timeout
        self.gone: set[str] = set()

    def left(self) -> float:
        """Seconds left of the leg's budget."""
        return self.deadline - time.monotonic()

    def failed(self, failure: PrefillAttemptFailed) -> None:
        if failure.connect_failed:
            self.gone.add(failure.host)

    async def hosts(self) -> AsyncIterator[str]:
        hosts, opts = self.ex.prefillers, self.ex.opts
        attempts, position = 0, 0
        while attempts < 1 + opts.prefill_retries and not self.gone.issuperset(hosts):
            host = hosts[position % len(hosts)]
            if position and position % len(hosts) == 0:
                await asyncio.sleep(max(0.0, min(opts.retry_backoff, self.left())))
            position += 1
            if host in self.gone:
                continue
            if self.left() <= 0:
                return
            attempts += 1
            yield host


async def run_prefill(ex: Exchange, body: bytes) -> PrefillReply:
    """The prefill leg with retries: each retry goes to the next prefiller of the header."""
    started = time.monotonic()
    failures: list[PrefillAttemptFailed] = []
    attempts = PrefillAttempts(ex)
    async for host in attempts.hosts():
        try:
            with tracing.span("connector.prefill", {"server.address": host}):
                doc = await attempt_prefill(ex, host, body, attempts.left())
        except PrefillAttemptFailed as failed:
            ex.metrics.prefill_failed(failed.reason)
            log.warning("request %s: prefill on %s", ex.request_id, failed)
            if not failed.retryable:
                raise attempt_error(failed) from None
            failures.append(failed)
            attempts.failed(failed)
            continue
        ex.metrics.prefill_done(time.monotonic() - started)
        return PrefillReply(host=host, body=doc, attempts=len(failures) + 1)
    raise exhausted_error(failures)
