"""The sidecar's HTTP server: passthrough to the local engine, or the two-leg path."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Protocol

import aiohttp
from aiohttp import web

from infergw.api import log_context, tracing
from infergw.api.names import PREFILLER_HEADER, REQUEST_ID_HEADER
from infergw.connector.allowlist import Allowlist, allowlist_for
from infergw.connector.http_kv import HttpConnector
from infergw.connector.metrics import ConnectorMetrics
from infergw.connector.nixl import NixlConnector
from infergw.connector.options import ConnectorOptions
from infergw.connector.sglang import SGLangConnector
from infergw.connector.upstream import (
    Exchange,
    LegError,
    dumps,
    error_response,
    open_upstream,
    relay,
    request_headers,
)

log = logging.getLogger("connector")

TWO_LEG_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_BODY_BYTES = 32 * 1024 * 1024
METRICS_PATH = "/connector/metrics"  # /metrics is the engine's: the picker scrapes it through us
HEALTH_PATH = "/health"  # the engine's readiness, and ours: not ready before the pool is known


class Connector(Protocol):
    name: str
    local_fallback: bool  # the local engine can serve a request whose prefill leg failed

    async def handle(self, ex: Exchange) -> web.StreamResponse: ...


CONNECTORS = {
    "nixl": lambda: NixlConnector("nixl"),
    "mooncake": lambda: NixlConnector("mooncake"),
    "http": lambda: HttpConnector("http"),
    "lmcache": lambda: HttpConnector("lmcache"),
    "sglang": SGLangConnector,
}


def parse_prefillers(value: str) -> list[str]:
    """`ip:port[,ip:port...]`, the first the primary; ValueError naming the bad entry."""
    out = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        ok = bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
        if ok and host.startswith("["):
            ok = host.endswith("]") and len(host) > 2
        if not ok or any(c in host for c in "/@?#% \t"):
            raise ValueError(f"{entry!r} is not host:port")
        out.append(entry)
    if not out:
        raise ValueError("no prefiller in the header")
    return out


class ConnectorProxy:
    def __init__(
        self,
        opts: ConnectorOptions,
        metrics: ConnectorMetrics | None = None,
        allowlist: Allowlist | None = None,
    ) -> None:
        self.opts = opts
        self.metrics = metrics or ConnectorMetrics(opts.kv_connector)
        self.allowlist = allowlist if allowlist is not None else allowlist_for(opts)
        self.connector: Connector = CONNECTORS[opts.kv_connector]()
        self._session: aiohttp.ClientSession | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get(METRICS_PATH, self.metrics_handler)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the app has not started"
        return self._session

    async def _start(self, _app: web.Application) -> None:
        await self.allowlist.start()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,  # bytes pass through as the engine sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            # add nothing the client did not send
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def _stop(self, _app: web.Application) -> None:
        await self.allowlist.stop()
        if self._session is not None:
            await self._session.close()

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # aiohttp runs each request in a task of its own: its log lines name it.
        log_context.bind_request(request.headers)
        if request.path == HEALTH_PATH and not self.allowlist.synced:
            return error_response(503, self.allowlist.refusal(""))
        header = request.headers.get(PREFILLER_HEADER, "").strip()
        if not header or request.method != "POST" or request.path not in TWO_LEG_PATHS:
            return await self.passthrough(request)
        self.metrics.request("disaggregated")
        span = None
        if tracing.enabled():  # the two legs are its children
            span = tracing.start_span(
                "connector.request",
                tracing.extract(request.headers),
                {"url.path": request.path, "infergate.kv_connector": self.connector.name},
                server=True,
            )
        status = 499  # the client left, unless an answer says otherwise
        try:
            with tracing.current(span):
                answer = await self._two_legs(request, header)
            status = answer.status
            return answer
        finally:
            error = str(status) if status >= 400 else ""
            tracing.end(span, {"http.response.status_code": status}, error=error)

    async def _two_legs(self, request: web.Request, header: str) -> web.StreamResponse:
        ex = None
        try:
            ex = await self._exchange(request, header)
            return await self.connector.handle(ex)
        except LegError as err:
            if ex is not None and err.local_fallback and self._may_fall_back():
                return await self.serve_locally(ex, err)
            self.metrics.error(err.reason)
            log.warning("%s %s: %s", request.method, request.path, err.message)
            return error_response(err.status, err.message)

    def _may_fall_back(self) -> bool:
        return self.opts.local_prefill_fallback and self.connector.local_fallback

    async def serve_locally(self, ex: Exchange, err: LegError) -> web.StreamResponse:
        """No prefiller could be reached: the client's request, as it came, on the local
        engine (aggregated: it prefills the prompt itself). Only prefill-leg failures get
        here, so nothing has been sent to the client yet."""
        assert err.local_fallback is not None
        self.metrics.prefill_fallback(err.local_fallback)
        log.warning(
            "request %s: %s; serving it on the local engine (--no-local-prefill-fallback "
            "turns this off)",
            ex.request_id,
            err.message,
        )
        try:
            upstream = await open_upstream(
                self.session,
                "POST",
                ex.engine_url,
                headers=ex.leg_headers(),
                data=await ex.request.read(),
                opts=self.opts,
                what="local prefill fallback: local engine",
            )
        except LegError as local:
            self.metrics.error(local.reason)
            log.warning("request %s: %s", ex.request_id, local.message)
            return error_response(local.status, f"{err.message}; then {local.message}")
        return await relay(ex.request, upstream, self.metrics)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """The request to the local engine unchanged but for hop-by-hop headers."""
        self.metrics.request("passthrough")
        data = await request.read() if request.body_exists else None
        try:
            upstream = await open_upstream(
                self.session,
                request.method,
                f"{self.opts.engine_url}{request.raw_path}",
                headers=request_headers(request.headers),
                data=data,
                opts=self.opts,
                what="local engine",
            )
        except LegError as err:
            self.metrics.error(err.reason)
            log.warning("%s %s: %s", request.method, request.raw_path, err.message)
            return error_response(err.status, err.message)
        return await relay(request, upstream, self.metrics)

    async def _exchange(self, request: web.Request, header: str) -> Exchange:
        try:
            prefillers = parse_prefillers(header)
        except ValueError as exc:
            raise LegError(400, f"bad {PREFILLER_HEADER} header: {exc}", "bad_header") from None
        # Before reading the body: a prefiller off the allowlist is sent nothing at all.
        for host in prefillers:
            if not self.allowlist.allows(host):
                raise LegError(403, self.allowlist.refusal(host), "prefiller_not_allowed")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise LegError(400, f"the request body is not valid JSON: {exc}", "bad_body") from None
        except RecursionError:
            raise LegError(400, "the request body is nested too deeply", "bad_body") from None
        if not isinstance(body, dict):
            raise LegError(400, "the request body must be a JSON object", "bad_body")
        try:
            dumps(body)  # what each leg sends: UTF-8, which a lone surrogate cannot be
        except UnicodeEncodeError:
            raise LegError(
                400, "the request body has a string that is not valid Unicode", "bad_body"
            ) from None
        return Exchange(
            request=request,
            body=body,
            prefillers=prefillers,
            headers=request_headers(
                request.headers, drop=frozenset({PREFILLER_HEADER, REQUEST_ID_HEADER})
            ),
            request_id=str(uuid.uuid4()),
            session=self.session,
            opts=self.opts,
            metrics=self.metrics,
        )
