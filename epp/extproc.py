"""The ext_proc servicer: one gRPC stream per HTTP request, FULL_DUPLEX_STREAMED bodies.

Request: headers are held until the body's end of stream, then the picker answers the
headers (destination) and echoes the body. Response: the served endpoint is added as a
header, and the body goes through the answer's response chain (`epp/response/`: usage read on
the side, and the edits the request needs) while timing is read.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from infergw.api import log_context, tracing
from infergw.epp import model_catalog, protocol
from infergw.epp.body_budget import BodyAccumulator, BodyBudget, BudgetShare
from infergw.epp.body_deadline import next_message
from infergw.epp.context import RequestContext
from infergw.epp.director import Director
from infergw.epp.errors import PickerError
from infergw.epp.metric_values import LocalTally
from infergw.epp.metrics import ITL_BUCKETS
from infergw.epp.request import InferenceRequest, parse_request, verified_user
from infergw.epp.request_trace import RequestTrace, trace_headers
from infergw.epp.response import MAX_HELD, ResponseChain, UsageReader, response_chain
from infergw.epp.scheduling.framework import ResponseInfo
from infergw.epp.stored_responses import answers_with_response, stores_answer

log = logging.getLogger("epp.extproc")


# Bytes parsing may hold beside the body, per body byte, while it runs (see on_request_body).
PARSE_OVERHEAD = 5


class _Stream:
    """The state of one HTTP request as the picker sees it."""

    def __init__(
        self,
        director: Director,
        budget: BodyBudget | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        self.director = director
        self.budget = budget or BodyBudget()
        # Tracing on: the W3C context Envoy sent with the stream, until the headers come.
        self.trace_context = trace_context
        self.trace: RequestTrace | None = None
        self.error_status = 0  # the status the picker answered with itself
        self.share = BudgetShare(self.budget)  # given back when the stream ends
        self.response_charged = 0  # the part of it the response chain holds
        self.headers: dict[str, str] = {}
        self.subset: list[str] | None = None
        self.body = BodyAccumulator(self.share, director.options.max_body_bytes)
        self.request_done = False
        self.body_open = False  # headers came without end of stream, the body's end not yet
        self.req: InferenceRequest | None = None  # once the director took it
        self.ctx: RequestContext | None = None
        self.started = time.monotonic()
        self.dispatched = 0.0
        self.status = 0
        self.served: str | None = None
        self.response: ResponseChain | None = None
        self.usage: UsageReader | None = None  # the chain's usage stage
        self.first_chunk: float | None = None
        self.response_bytes = 0
        self.last_chunk: float | None = None
        self.chunk_gaps: LocalTally | None = None  # a streamed answer's
        self.finished = False
        # Whether the answer's body passes through here, as Envoy announces on the stream's
        # first message (None: this proxy does not say).
        self.response_bodies: bool | None = None
        # The answer holds stored responses' ids, to stamp with the serving pod's.
        self.stamps_ids = False

    # ---- request phase ---------------------------------------------------------------

    def on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if msg.HasField("protocol_config"):
            self.response_bodies = msg.protocol_config.response_body_mode != protocol.BODY_NONE
        self.headers = protocol.header_map(msg.request_headers.headers)
        # From here every log line of this stream names the request (api/log_context.py).
        log_context.bind_request(self.headers)
        self.subset = protocol.subset_hint(msg)
        if self.trace_context is not None:
            self.trace = RequestTrace(self.trace_context, self.headers)
        if not msg.request_headers.end_of_stream:
            self.body_open = not self.request_done
            return []  # deferred until the body ends
        self.request_done = True
        method, path = self.headers.get(":method", ""), self.headers.get(":path", "")
        models = model_catalog.answer(self.director.datastore, method, path)
        if models is not None:  # the gateway's names, not one pod's (epp/model_catalog.py)
            return [protocol.immediate(200, models)]
        targets, new_path = self.director.route_bodyless(
            method, path, self.subset, verified_user(self.headers)
        )
        self.stamps_ids = answers_with_response(method, path)
        extra = {":path": new_path} if new_path else None
        return [protocol.destination_headers([e.address for e in targets], None, extra)]

    async def on_request_body(self, msg: pb.ProcessingRequest) -> Iterable[pb.ProcessingResponse]:
        if self.request_done:
            return []  # a duplicate end of stream, or body after a body-less pick
        chunk = msg.request_body
        self.body.add(chunk.body)
        if not chunk.end_of_stream:
            return []
        self.request_done = True
        self.body_open = False  # what follows (the queue, the answer) is not bounded here
        path = self.headers.get(":path", "")
        # Parsing briefly holds more than the body: its bytes copy and the prompt as text (up
        # to 4 bytes a character). Reserve that before building it, then settle to what the
        # request keeps, so the budget bounds the peak and not only what is left after it.
        raw = self.body.take_all(PARSE_OVERHEAD)  # held once, by the request
        trace = self.trace
        if trace is None:
            req = parse_request(path, raw, self.headers, max_body_bytes=self.body.limit)
        else:
            with tracing.current(trace.request), trace.parse():
                req = parse_request(path, raw, self.headers, max_body_bytes=self.body.limit)
            trace.parsed(req)
        self.share.settle(req.held_bytes)
        log_context.name_request(req.request_id)  # the id the picker made, if Envoy gave none
        ctx = RequestContext(req, subset=self.subset)
        self.stamps_ids = stores_answer(req)  # (a bad `store` is 400 before the gate counts it)
        if trace is None:
            await self.director.handle(ctx)
        else:
            with tracing.current(trace.request):
                await self.director.handle(ctx)
            trace.decided(ctx)
            if trace.request is not None:  # the pod continues the picker's trace
                tracing.inject(ctx.upstream_headers, trace.request)
        self.req, self.ctx = req, ctx
        out_body = ctx.upstream_body()
        # Sizes, never the body: prompts and completions stay out of logs.
        log.debug(
            "ext_proc: %s model %r -> %s",
            path,
            req.model,
            ctx.targets,
            extra={"request_bytes": len(raw), "upstream_bytes": len(out_body)},
        )
        self.dispatched = time.monotonic()
        self.director.metrics.processing.observe(self.dispatched - self.started)
        # Chunks are built as they are sent, not all at once beside the body.
        return itertools.chain(
            [protocol.destination_headers(ctx.targets, len(out_body), ctx.upstream_headers)],
            protocol.request_body_chunks(out_body),
        )

    # ---- response phase --------------------------------------------------------------

    def on_response_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        headers = protocol.header_map(msg.response_headers.headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        self.served = protocol.served_endpoint(msg) or (
            self.ctx.targets[0] if self.ctx and self.ctx.targets else None
        )
        streaming = "text/event-stream" in headers.get("content-type", "")
        if streaming:
            self.chunk_gaps = LocalTally(ITL_BUCKETS)
        ctx = self.ctx
        stamper = None
        if self.stamps_ids and 200 <= self.status < 300 and self.served:
            # The ids belong to the verified user who asked (epp/response_ids.py).
            stamper = self.director.stored.stamper(
                self.director.datastore.endpoint(self.served), verified_user(self.headers)
            )
        self.response, self.usage = response_chain(
            streaming,
            strip_usage=bool(ctx and ctx.strip_usage),
            served=ctx.target_model if ctx else "",
            asked=ctx.request.model if ctx else "",
            extra=stamper,
        )
        if self.trace is not None:
            self.trace.response_started(self.status, self.served)
        if msg.response_headers.end_of_stream:
            self.finish()
        # Otherwise the request ends with the body's end of stream or, when the proxy keeps
        # response bodies away from the picker, when the proxy closes this stream.
        return [protocol.served_headers(self.served)]

    def on_response_body(self, msg: pb.ProcessingRequest) -> Iterable[pb.ProcessingResponse]:
        # Once per streamed token: kept to what each chunk needs.
        chunk = msg.response_body
        data = chunk.body
        eos = chunk.end_of_stream
        if data:
            now = time.monotonic()
            if self.first_chunk is None:
                self.first_chunk = now
            elif self.chunk_gaps is not None:
                self.chunk_gaps.add(now - self.last_chunk)
            self.last_chunk = now
            self.response_bytes += len(data)
        response = self.response
        if response is None:
            out: list[bytes | bytearray] = [data]
        else:
            out = response.feed(data)
            if response.held_bytes != self.response_charged:
                out += self._account_held()
            if eos:
                out += response.flush()
        if eos:
            self.finish()
        return protocol.response_body_chunks(out, eos)

    def _account_held(self) -> list[bytes | bytearray]:
        """Charge the budget for what the response chain holds; past it, the chain passes it
        on unread (returned here) and usage goes unread."""
        out: list[bytes | bytearray] = []
        held = self.response.held_bytes
        if held > self.response_charged and not self.budget.fits(held - self.response_charged):
            out = self.response.release()
            self.director.metrics.bad_requests.labels("response_over_budget").inc()
            log.warning(
                "ext_proc: the request bytes budget is spent: the usage of the answer to %s "
                "from %s is not read",
                self.req.request_id if self.req else "?",
                self.served,
            )
            held = self.response.held_bytes
        delta, self.response_charged = held - self.response_charged, held
        self.share.settle(self.share.held + delta)
        return out

    def finish(self, cancelled: bool = False, status_unseen: bool = False) -> None:
        if self.finished or self.ctx is None:
            self.finished = True
            if self.trace is not None:  # answered by the picker itself, or never routed
                self.trace.finished(None, "rejected" if self.error_status else "ok",
                                    self.error_status)  # fmt: skip
            return
        self.finished = True
        if self.response is not None:
            self.response.flush()  # the last event is read (passed on only at end of stream)
        usage = self.usage.usage if self.usage else None
        if self.usage is not None and self.usage.lines_too_long:
            self.director.metrics.bad_requests.labels("response_line_too_long").inc(
                self.usage.lines_too_long
            )
            log.warning(
                "ext_proc: %d line(s) of the answer to %s from %s exceeded %d bytes; "
                "their usage was not read",
                self.usage.lines_too_long,
                self.req.request_id,
                self.served,
                MAX_HELD,
            )
        # Without usage (the client left mid-answer, or the engine sends none), a streamed
        # answer's events count its tokens: one a token, less [DONE] (or a role-only first
        # event) — at most one short, so a client cannot dodge its output charge by leaving.
        streamed = None
        if self.usage is not None and self.usage.streaming and self.usage.events > 1:
            streamed = self.usage.events - 1
        ttft = tpot = client_ttft = None
        if self.first_chunk is not None:
            ttft = self.first_chunk - self.dispatched
            client_ttft = self.first_chunk - self.started
            n = usage.completion_tokens if usage else None
            if n is None:
                n = streamed
            if n and n > 1 and self.last_chunk is not None and self.usage.streaming:
                tpot = (self.last_chunk - self.first_chunk) / (n - 1)
        served = self.director.datastore.endpoint(self.served) if self.served else None
        info = ResponseInfo(
            endpoint=served,
            status=None if status_unseen else 0 if cancelled else self.status,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            cached_tokens=usage.cached_tokens if usage else None,
            ttft=ttft,
            tpot=tpot,
            response_bytes=self.response_bytes,
            client_ttft=client_ttft,
            chunk_gaps=self.chunk_gaps,
        )
        self.director.finish(self.ctx, info, self.started, streamed)
        log.debug(
            "ext_proc: answered %s from %s",
            info.status,
            self.served,
            extra={
                "prompt_tokens": info.prompt_tokens,
                "completion_tokens": info.completion_tokens,
                "seconds": round(time.monotonic() - self.started, 3),
            },
        )
        if self.trace is not None:
            status = info.status
            outcome = "cancelled" if status == 0 else "error" if (status or 0) >= 400 else "ok"
            self.trace.finished(info, outcome, streamed_tokens=streamed)

    def close(self) -> None:
        """The stream ended before the answer's end. Before any response headers that means
        the request was cancelled (client or proxy gone) — unless the proxy sends none, when
        it means the answer ended. After them: when the proxy announced that response bodies
        pass through here, the client or proxy left mid-answer (cancelled); otherwise the
        answer was delivered without its body passing through here."""
        if not self.finished:
            if self.response is None and self.director.options.response_headers_skipped:
                self.finish(status_unseen=True)
            elif self.response is not None and self.response_bodies:
                self.finish(cancelled=True)
            else:
                self.finish(cancelled=self.status == 0)
        self.share.release()


class ExternalProcessor(pbg.ExternalProcessorServicer):
    def __init__(self, director: Director, budget: BodyBudget | None = None) -> None:
        self.director = director
        self.budget = budget or BodyBudget()

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        trace_context = None
        if tracing.enabled():
            # No context: called directly (bench/epp_pipeline.py), not over gRPC.
            trace_context = trace_headers(context.invocation_metadata() if context else None)
        stream = _Stream(self.director, self.budget, trace_context)
        body_timeout = self.director.options.request_body_timeout
        messages = request_iterator.__aiter__()
        try:
            tally = self.director.metrics.extproc_messages.counts
            while True:
                try:
                    msg = await next_message(messages, stream, body_timeout)
                except StopAsyncIteration:
                    break
                except PickerError as exc:  # the body stalled
                    self.director.metrics.bad_requests.labels("body_timeout").inc()
                    self._count_error(stream, exc)
                    yield protocol.immediate(exc.status, exc.body(), exc.headers)
                    return
                kind = msg.WhichOneof("request")
                if kind in tally:
                    tally[kind] += 1
                try:
                    # The most frequent first: a streamed answer is a message a token.
                    if kind == "response_body":
                        out = stream.on_response_body(msg)
                    elif kind == "request_headers":
                        out = stream.on_request_headers(msg)
                    elif kind == "request_body":
                        out = await stream.on_request_body(msg)
                    elif kind == "response_headers":
                        out = stream.on_response_headers(msg)
                    elif kind == "request_trailers":
                        out = [protocol.empty_request_trailers()]
                    elif kind == "response_trailers":
                        stream.finish()
                        out = [protocol.empty_response_trailers()]
                    else:
                        self.director.metrics.bad_requests.labels("unknown_message").inc()
                        log.warning("ext_proc: ignoring message of unknown kind %r", kind)
                        out = []
                except PickerError as exc:
                    self._count_error(stream, exc)
                    yield protocol.immediate(exc.status, exc.body(), exc.headers)
                    return
                except Exception:
                    log.exception(
                        "ext_proc: internal error on %s (path %s)",
                        kind,
                        stream.headers.get(":path"),
                    )
                    err = PickerError(500, "internal error in the endpoint picker")
                    self._count_error(stream, err)
                    yield protocol.immediate(500, err.body())
                    return
                for resp in out:
                    yield resp
        finally:
            stream.close()
            log_context.unbind_request()

    def _count_error(self, stream: _Stream, exc: PickerError) -> None:
        stream.error_status = exc.status
        model = stream.req.model if stream.req else ""
        target = stream.ctx.target_model if stream.ctx else ""
        self.director.metrics.errors.labels(model, target, str(exc.status)).inc()
        log.info(
            "ext_proc: %s %s -> %d %s",
            stream.headers.get(":method", "?"),
            stream.headers.get(":path", "?"),
            exc.status,
            exc.message,
        )
