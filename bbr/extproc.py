"""The router's ext_proc servicer: one gRPC stream per HTTP request, the request body
FULL_DUPLEX_STREAMED (Envoy never sends it the answer).

The request's headers are held until the body's end of stream (its `model` may come last),
then answered with `x-gateway-model-name: <pool>` and `clear_route_cache`, so Envoy matches
the request to that pool's HTTPRoute — and the pool's picker, configured on that route, runs
next — and the body is echoed unchanged. The body is read with the picker's own decoding
(epp/request_body.py): what the router accepts, the picker accepts too, and both read the
same `model` member. A client's copy of the header is always overwritten or removed.
A body-less request goes on without the header, but for `GET /v1/models` (answered here) and
a stored response's routes (`/v1/responses/{id}`…), whose id names its pool.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from infergw.api import log_context, tracing
from infergw.api.names import MODEL_NAME_HEADER
from infergw.bbr import metrics as m
from infergw.bbr.metrics import RouterMetrics
from infergw.bbr.sources import Table
from infergw.epp import protocol
from infergw.epp.body_budget import BodyAccumulator, BodyBudget, BudgetShare
from infergw.epp.body_deadline import DEFAULT_REQUEST_BODY_TIMEOUT, next_message
from infergw.epp.errors import ModelNotFound, PickerError, ResponseNotFound, bounded
from infergw.epp.model_catalog import answer_from
from infergw.epp.request import FORM_APIS, api_for_path, form_model
from infergw.epp.request_body import check_routed_member, decode_body, requested_model
from infergw.epp.request_trace import trace_headers
from infergw.epp.response_ids import REFUSED_NEXT, BadResponseId, pool_named
from infergw.epp.stored_responses import response_id_in_path

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("bbr.extproc")

DETAILS = "infergate_bbr"  # Envoy's response code details for the router's own answers


@dataclass(frozen=True, slots=True)
class RouterOptions:
    max_body_bytes: int
    # True: a body the router cannot read (not JSON, no `model`) goes on without the header
    # (no HTTPRoute matches it: the gateway's catch-all answers); False: 400 here.
    pass_bad_bodies: bool = False
    # Longest gap between two parts of an open request body (epp/body_deadline.py); 0: none.
    request_body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT


def route_headers(pool: str | None, content_length: int | None) -> pb.ProcessingResponse:
    """The deferred request-headers answer: the pool's header (or none) and a route re-match."""
    resp = pb.ProcessingResponse()
    common = resp.request_headers.response
    mutation = common.header_mutation
    if pool is None:
        mutation.remove_headers.append(MODEL_NAME_HEADER)
    else:
        mutation.set_headers.append(_header(MODEL_NAME_HEADER, pool))
    if content_length is not None:
        mutation.set_headers.append(_header("content-length", str(content_length)))
    common.clear_route_cache = True
    return resp


def _header(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=key, raw_value=value.encode()),
        append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class _Stream:
    """One HTTP request as the router sees it."""

    def __init__(
        self,
        table: Table,
        options: RouterOptions,
        budget: BodyBudget,
        metrics: RouterMetrics,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        self.table = table
        self.options = options
        self.share = BudgetShare(budget)  # given back when the stream ends
        self.metrics = metrics
        self.headers: dict[str, str] = {}
        self.body = BodyAccumulator(self.share, options.max_body_bytes)
        self.done = False
        self.body_open = False  # headers came without end of stream, the body's end not yet
        self.model = ""
        # Tracing on: the W3C context Envoy sent with the stream (its ext_proc call's span),
        # and `router.request`, from the headers to the pool's choice.
        self.trace_context = trace_context
        self.span: Span | None = None

    def on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self.headers = protocol.header_map(msg.request_headers.headers)
        log_context.bind_request(self.headers)  # this stream's log lines name the request
        if self.trace_context is not None:
            parent = tracing.extract(self.trace_context) or tracing.extract(self.headers)
            path = self.headers.get(":path", "").partition("?")[0][:256]
            self.span = tracing.start_span(
                "router.request", parent, {"url.path": path}, server=True
            )
        if not msg.request_headers.end_of_stream:
            self.body_open = not self.done
            return []  # deferred until the body ends
        self.done = True
        method, path = self.headers.get(":method", ""), self.headers.get(":path", "")
        pool = self._stored_response_pool(method, path)
        self.metrics.requests.labels(m.ROUTED if pool is not None else m.BODYLESS).inc()
        self.traced("routed" if pool is not None else "bodyless", pool)
        table = self.table
        models = answer_from(lambda: table.current.cards(table.namespace), method, path)
        if models is not None:  # every name served on this Gateway, not one pool's
            return [protocol.immediate(200, models, details=DETAILS)]
        return [route_headers(pool, None)]

    def _stored_response_pool(self, method: str, path: str) -> str | None:
        """For `GET`/`DELETE /v1/responses/{id}` (and `…/cancel`, `…/input_items`), which
        name no model: the pool the id names (epp/response_ids.py). The router has no pool's
        key: that pool's picker checks the id. None: not a path naming one of our ids."""
        response_id = response_id_in_path(method, path)
        if response_id is None:
            return None
        try:
            pool = pool_named(response_id)
        except BadResponseId as exc:
            raise ResponseNotFound(response_id, f"{exc}; {REFUSED_NEXT}") from None
        if pool is None:  # an engine's own id: no pool to tell
            return None
        if pool not in self.table.current.pools:
            raise ResponseNotFound(
                response_id,
                f"InferencePool {pool}, which stored it, is not served here; send the "
                "conversation again in full, without previous_response_id",
            )
        self.metrics.routed.labels(pool).inc()
        log.debug("bbr: %s %s -> pool %s (the response id)", method, bounded(path), pool)
        return pool

    def on_request_body(self, msg: pb.ProcessingRequest) -> Iterable[pb.ProcessingResponse]:
        if self.done:
            return []  # a duplicate end of stream
        chunk = msg.request_body
        self.body.add(chunk.body)
        if not chunk.end_of_stream:
            return []
        self.done = True
        self.body_open = False
        raw = self.body.take_all()  # the copy, charged while both are held
        pool = self._pool_for(raw)
        self.traced("routed" if pool else "passed", pool, len(raw))
        return itertools.chain([route_headers(pool, len(raw))], protocol.request_body_chunks(raw))

    def _pool_for(self, raw: bytes) -> str | None:
        path = self.headers.get(":path", "")
        try:
            if api_for_path(path) in FORM_APIS:  # an upload: `model` is a form field
                self.model = form_model(raw, self.headers).value
            else:
                body = decode_body(raw)
                self.model = requested_model(body)
                check_routed_member(raw, "model", body.model)
        except PickerError as exc:
            if not self.options.pass_bad_bodies:
                raise
            log.info("bbr: passing on a body it cannot route: %s", exc.message)
            self.metrics.requests.labels(m.PASSED).inc()
            return None
        choice = self.table.current.choose(self.model, self.headers, path, random)
        if choice is None:
            raise ModelNotFound(self.model)
        self.metrics.requests.labels(m.ROUTED).inc()
        self.metrics.routed.labels(choice.pool).inc()
        log.debug("bbr: model %r -> pool %s (%s)", self.model, choice.pool, choice.via)
        return choice.pool

    def traced(self, outcome: str, pool: str | None = None, size: int = 0, status: int = 0) -> None:
        """End `router.request` (tracing on): the model's name and the pool, never the body."""
        if self.span is None:
            return
        attrs: dict[str, object] = {"infergate.outcome": outcome}
        if self.model:
            attrs["gen_ai.request.model"] = bounded(self.model)
        if pool:
            attrs["infergate.pool"] = pool
        if size:
            attrs["http.request.body.size"] = size
        if status:
            attrs["http.response.status_code"] = status
        tracing.end(self.span, attrs, error=str(status) if status else "")
        self.span = None

    def close(self) -> None:
        self.traced("cancelled")  # the client left before the body's end
        self.share.release()


class BodyRouter(pbg.ExternalProcessorServicer):
    def __init__(
        self,
        table: Table,
        options: RouterOptions,
        budget: BodyBudget,
        metrics: RouterMetrics,
    ) -> None:
        self.table = table
        self.options = options
        self.budget = budget
        self.metrics = metrics

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        trace_context = None
        if tracing.enabled():  # no context: called in-process, not over gRPC
            trace_context = trace_headers(context.invocation_metadata() if context else None)
        stream = _Stream(self.table, self.options, self.budget, self.metrics, trace_context)
        body_timeout = self.options.request_body_timeout
        messages = request_iterator.__aiter__()
        try:
            while True:
                try:
                    msg = await next_message(messages, stream, body_timeout)
                except StopAsyncIteration:
                    break
                except PickerError as exc:  # the body stalled
                    self._count(stream, exc)
                    yield protocol.immediate(exc.status, exc.body(), exc.headers, details=DETAILS)
                    return
                kind = msg.WhichOneof("request")
                try:
                    out = self._answer(stream, kind, msg)
                except PickerError as exc:
                    self._count(stream, exc)
                    yield protocol.immediate(exc.status, exc.body(), exc.headers, details=DETAILS)
                    return
                except Exception:
                    log.exception("bbr: internal error on %s", kind)
                    err = PickerError(500, "internal error in the body-based router")
                    self._count(stream, err)
                    yield protocol.immediate(500, err.body(), details=DETAILS)
                    return
                for resp in out:
                    yield resp
        finally:
            stream.close()
            log_context.unbind_request()

    @staticmethod
    def _answer(stream: _Stream, kind: str | None, msg) -> Iterable[pb.ProcessingResponse]:
        if kind == "request_headers":
            return stream.on_request_headers(msg)
        if kind == "request_body":
            return stream.on_request_body(msg)
        if kind == "request_trailers":
            return [protocol.empty_request_trailers()]
        # The router asks for no part of the answer; a proxy configured to send it anyway
        # gets it back unchanged.
        if kind == "response_headers":
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if kind == "response_body":
            body = msg.response_body
            return [protocol.response_chunk(body.body, body.end_of_stream)]
        if kind == "response_trailers":
            return [protocol.empty_response_trailers()]
        log.warning("bbr: ignoring message of unknown kind %r", kind)
        return []

    def _count(self, stream: _Stream, exc: PickerError) -> None:
        stream.traced("rejected", status=exc.status)
        if isinstance(exc, ModelNotFound):
            result = m.MODEL_NOT_FOUND
            self.metrics.unknown_models.inc()
        elif isinstance(exc, ResponseNotFound):
            result = m.RESPONSE_NOT_FOUND
        else:
            result = m.RESULT_BY_STATUS.get(exc.status, str(exc.status))
        self.metrics.requests.labels(result).inc()
        log.info(
            "bbr: %s %s (model %r) -> %d %s",
            stream.headers.get(":method", "?"),
            stream.headers.get(":path", "?"),
            bounded(stream.model),
            exc.status,
            exc.message,
        )
