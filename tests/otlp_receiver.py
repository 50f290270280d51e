"""OTLP trace receivers the tracing tests run on 127.0.0.1: over HTTP (POST /v1/traces,
protobuf) and over gRPC (the TraceService), both decoding `ExportTraceServiceRequest` with
opentelemetry-proto and keeping every span they get, flattened (`ReceivedSpan`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2 as pb,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2_grpc as pbg,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict
    start_ns: int
    end_ns: int
    error: bool


def _value(v: AnyValue):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


class Spans:
    """What a receiver got, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0

    def add(self, req: pb.ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            service=str(res.get("service.name", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            error=s.status.code == 2,
                        )
                    )
        with self._lock:
            self._spans += got
            self.requests += 1

    def all(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 20
    ) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.all()
            if done(spans):
                return spans
            time.sleep(0.1)
        return self.all()


class HttpReceiver:
    """OTLP/HTTP protobuf on 127.0.0.1; `endpoint` is its base URL."""

    def __init__(self) -> None:
        self.spans = Spans()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self._body()
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = pb.ExportTraceServiceRequest()
                req.ParseFromString(data)
                spans.add(req)
                body = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("transfer-encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("content-length", "0")))
                data = b""
                while True:  # chunked (Envoy's exporter streams its body)
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HttpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _TraceService(pbg.TraceServiceServicer):
    def __init__(self, spans: Spans) -> None:
        self.spans = spans

    def Export(self, request, context):
        self.spans.add(request)
        return pb.ExportTraceServiceResponse()


class GrpcReceiver:
    """OTLP/gRPC on 127.0.0.1 (what Envoy's OpenTelemetry tracer speaks)."""

    def __init__(self) -> None:
        self.spans = Spans()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pbg.add_TraceServiceServicer_to_server(_TraceService(self.spans), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> GrpcReceiver:
        self.server.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.stop(grace=None)
