"""The sglang connector: prefill and decode sent at the same time, both carrying the prefill
pod's bootstrap address and one random `bootstrap_room`, as SGLang's PD router does. The decode
engine meets the prefill engine at its bootstrap server, so neither leg can wait for the other.

The decode's answer is held until the prefill leg has answered: if that prefiller fails in a
way worth retrying, the pair is dropped (both connections closed, so both engines abort) and a
new pair, with a new room, goes to the next prefiller of the header."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
from aiohttp import web

from infergw.connector.prefill import (
    PrefillAttemptFailed,
    PrefillAttempts,
    attempt_error,
    attempt_prefill,
    exhausted_error,
)
from infergw.connector.upstream import Exchange, dumps, open_upstream, relay

log = logging.getLogger("connector.sglang")


def bootstrap_fields(prefiller: str, bootstrap_port: int, room: int) -> dict:
    host = prefiller.rsplit(":", 1)[0]
    return {"bootstrap_host": host, "bootstrap_port": bootstrap_port, "bootstrap_room": room}


def new_room() -> int:
    return random.getrandbits(63)  # SGLang's routers draw from [0, 2**63)


def prefill_body(body: dict, fields: dict) -> dict:
    """Not streamed, so its answer tells when the prefill is over."""
    out = {**body, **fields}
    out.pop("stream_options", None)
    out["stream"] = False
    return out


def decode_body(body: dict, fields: dict) -> dict:
    return {**body, **fields}


class SGLangConnector:
    name = "sglang"
    # An SGLang decode server in disaggregation mode serves nothing without its prefill
    # peer's bootstrap: there is no local fallback.
    local_fallback = False

    async def handle(self, ex: Exchange) -> web.StreamResponse:
        started = time.monotonic()
        failures: list[PrefillAttemptFailed] = []
        attempts = PrefillAttempts(ex)
        async for host in attempts.hosts():
            fields = bootstrap_fields(host, ex.opts.sglang_bootstrap_port, new_room())
            try:
                decode, prefilled = await self._pair(ex, host, fields, attempts.left())
            except PrefillAttemptFailed as failed:
                ex.metrics.prefill_failed(failed.reason)
                log.warning("request %s: prefill on %s", ex.request_id, failed)
                if not failed.retryable:
                    raise attempt_error(failed) from None
                failures.append(failed)
                attempts.failed(failed)
                continue
            if prefilled:
                ex.metrics.prefill_done(time.monotonic() - started)
            return await relay(ex.request, decode, ex.metrics)
        raise exhausted_error(failures)

    async def _pair(
        self, ex: Exchange, host: str, fields: dict, left: float
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """Run one prefill/decode pair, the prefill given `left` seconds; the decode response
        to relay (its headers read) and whether the prefill finished. A decode the engine
        refused is returned at once."""
        prefill = asyncio.create_task(
            attempt_prefill(ex, host, dumps(prefill_body(ex.body, fields)), left)
        )
        decode = asyncio.create_task(
            open_upstream(
                ex.session,
                "POST",
                ex.engine_url,
                headers=ex.leg_headers(),
                data=dumps(decode_body(ex.body, fields)),
                opts=ex.opts,
                what="decode leg: local engine",
            )
        )
        handed_over = False
        try:
            done, _ = await asyncio.wait({prefill, decode}, return_when=asyncio.FIRST_COMPLETED)
            if decode in done and prefill not in done:
                resp = decode.result()  # LegError if the engine is unreachable
                if not 200 <= resp.status < 300:
                    handed_over = True
                    return resp, False  # the engine's own error, relayed as is
            await prefill  # PrefillAttemptFailed ends this pair
            resp = await decode
            handed_over = True
            return resp, True
        finally:
            await _drop(prefill, decode, keep=decode if handed_over else None)


async def _drop(*tasks: asyncio.Task, keep: asyncio.Task | None) -> None:
    """Cancel unfinished legs and close responses nobody will read (closing the connection is
    what tells an engine the request is gone)."""
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if t is keep or t.cancelled() or t.exception() is not None:
            continue
        result = t.result()
        if isinstance(result, aiohttp.ClientResponse):
            result.close()
