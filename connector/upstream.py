"""What every leg shares: header rules, OpenAI-style errors, the decode leg and the relay of an
upstream response to the client, chunk by chunk."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from infergw.api import tracing
from infergw.api.names import REQUEST_ID_HEADER
from infergw.connector.metrics import ConnectorMetrics
from infergw.connector.options import ConnectorOptions

log = logging.getLogger("connector")

# RFC 9110 §7.6.1: meant for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Set again by the client library for the upstream request.
REQUEST_ONLY = frozenset({"host", "content-length", "expect"})

ERROR_TYPES = {
    400: "BadRequest",
    403: "Forbidden",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def _connection_tokens(headers: MultiMapping[str]) -> set[str]:
    """Header names the Connection header declares hop-by-hop as well."""
    names: set[str] = set()
    for value in headers.getall("connection", []):
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def _without(headers: MultiMapping[str], drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    drop = drop | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in drop:
            out.add(name, value)
    return out


def request_headers(
    headers: MultiMapping[str], *, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Client request headers to send upstream: no hop-by-hop ones, no Host or Content-Length."""
    return _without(headers, REQUEST_ONLY | drop)


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """Upstream response headers to send the client (Content-Length stays: bodies are not
    decompressed, so the length is still right)."""
    return _without(headers, frozenset())


def error_response(status: int, message: str) -> web.Response:
    """An OpenAI-style error, like vLLM's and the picker's, so SDKs show the message."""
    kind = ERROR_TYPES.get(status, "Error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class LegError(Exception):
    """A leg failed in a way the client must hear about: becomes `error_response`.

    `local_fallback`: set (to the last prefill attempt's failure reason) when no prefiller
    could be reached, or each said it was overloaded, and nothing has been sent to the client:
    the local engine may serve the request whole."""

    def __init__(
        self, status: int, message: str, reason: str, *, local_fallback: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.local_fallback = local_fallback


def describe(exc: BaseException) -> tuple[str, str]:
    """(metric reason, human text) for a failed upstream call."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", "could not connect in time (--connect-timeout)"
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError too
        return "timeout", "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        why = os.strerror(err.errno) if err.errno else str(err)
        return "connect_error", f"connection failed: {why}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "closed the connection without answering"
    return "client_error", f"{type(exc).__name__}: {exc}"


MAX_ECHOED_CHARS = 160  # of an upstream's error message, in ours to the client


def sanitized(text: str, limit: int = MAX_ECHOED_CHARS) -> str:
    """At most `limit` printable characters: what an upstream or a client said, fit to quote
    in an answer or a log line (no control characters, no forged line breaks)."""
    cut = text[: limit + 1]
    clean = "".join(c if c.isprintable() else "?" for c in cut[:limit])
    return clean + "…" if len(cut) > limit else clean


def error_text(raw: bytes) -> str:
    """What an upstream's error body says, fit to show the client: the message of an
    OpenAI-style error (`error.message`, or a top-level `message`), sanitized and cut short;
    any other body is not echoed, only its size."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    msg = None
    if isinstance(doc, dict):
        err = doc.get("error")
        msg = err.get("message") if isinstance(err, dict) else None
        if msg is None:
            msg = doc.get("message")
    if isinstance(msg, str):
        return sanitized(msg)
    return f"a body without an error message ({len(raw)} bytes)"


@dataclass(slots=True)
class Exchange:
    """One client request taking the two-leg path, and what its legs need."""

    request: web.Request
    body: dict
    prefillers: list[str]
    headers: CIMultiDict[str]  # client headers fit to send upstream
    request_id: str
    session: aiohttp.ClientSession
    opts: ConnectorOptions
    metrics: ConnectorMetrics

    def leg_headers(self) -> CIMultiDict[str]:
        h = CIMultiDict(self.headers)
        h[REQUEST_ID_HEADER] = self.request_id
        h["Content-Type"] = "application/json"
        tracing.inject(h)  # the leg's span (tracing on) is the engine's parent
        return h

    def prefill_url(self, host_port: str) -> str:
        return f"http://{host_port}{self.request.raw_path}"

    @property
    def engine_url(self) -> str:
        return f"{self.opts.engine_url}{self.request.raw_path}"


def decode_timeout(opts: ConnectorOptions) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None,
        connect=opts.connect_timeout,
        sock_connect=opts.connect_timeout,
        sock_read=opts.decode_timeout,
    )


async def open_upstream(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    data: bytes | None,
    opts: ConnectorOptions,
    what: str,
) -> aiohttp.ClientResponse:
    """Send a request and return once its response headers are in; the caller owns the
    response (pass it to `relay`). Failures before the headers become a LegError."""
    try:
        return await session.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=decode_timeout(opts),
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        reason, text = describe(exc)
        if text == "timed out":
            text = f"sent nothing for {opts.decode_timeout:g}s (--decode-timeout)"
        status = 504 if reason == "timeout" else 502
        raise LegError(status, f"{what} at {url}: {text}", f"engine_{reason}") from exc


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, metrics: ConnectorMetrics
) -> web.StreamResponse:
    """Stream `upstream` to the client as it arrives: status, reason and end-to-end headers
    kept. The upstream connection is closed if the client goes away (the handler is
    cancelled) or the upstream breaks; a broken upstream also cuts the client's connection so
    the client sees a truncated body, never a clean end."""
    out = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=response_headers(upstream.headers),
    )
    try:
        await out.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                reason, text = describe(exc)
                log.warning("upstream %s broke mid-response: %s", upstream.url, text)
                metrics.error(f"midstream_{reason}")
                upstream.close()
                if request.transport is not None:
                    request.transport.close()
                return out
            if not chunk:
                break
            await out.write(chunk)
        await out.write_eof()
    except BaseException:  # client gone (handler cancelled) or its socket broke
        upstream.close()
        raise
    finally:
        upstream.release()
    return out


def dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def run_decode(ex: Exchange, body: dict) -> web.StreamResponse:
    """The decode leg: `body` to the local engine, its answer streamed back to the client."""
    with tracing.span("connector.decode", {"server.address": ex.opts.engine_url}):
        resp = await open_upstream(
            ex.session,
            "POST",
            ex.engine_url,
            headers=ex.leg_headers(),
            data=dumps(body),
            opts=ex.opts,
            what="decode leg: local engine",
        )
        return await relay(ex.request, resp, ex.metrics)
