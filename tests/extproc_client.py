"""Play Envoy's part of the ext_proc protocol from a test: build messages, read answers."""

from __future__ import annotations

import json

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from google.protobuf import struct_pb2


def headers(
    path: str = "/v1/completions",
    eos: bool = False,
    extra: dict | None = None,
    subset=None,
    response_body_mode: int | None = None,
) -> pb.ProcessingRequest:
    """A stream's first message; `response_body_mode` set: the modes Envoy announces on it
    (a ProcessingMode.BodySendMode), as Envoy 1.40 does."""
    hs = {
        ":method": "POST",
        ":path": path,
        ":authority": "gw",
        "content-type": "application/json",
        **(extra or {}),
    }
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=core.HeaderMap(
                headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]
            ),
            end_of_stream=eos,
        )
    )
    if response_body_mode is not None:
        msg.protocol_config.request_body_mode = pm.ProcessingMode.FULL_DUPLEX_STREAMED
        msg.protocol_config.response_body_mode = response_body_mode
    if subset is not None:
        s = struct_pb2.Struct()
        s.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(s)
    return msg


def body(data: bytes | dict, eos: bool = True) -> pb.ProcessingRequest:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=eos))


def response_headers(
    status: int = 200,
    content_type: str = "application/json",
    served: str | None = None,
    eos: bool = False,
) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=core.HeaderMap(
                headers=[
                    core.HeaderValue(key=":status", raw_value=str(status).encode()),
                    core.HeaderValue(key="content-type", raw_value=content_type.encode()),
                ]
            ),
            end_of_stream=eos,
        )
    )
    if served:
        s = struct_pb2.Struct()
        s.update({"x-gateway-destination-endpoint-served": served})
        msg.metadata_context.filter_metadata["envoy.lb"].CopyFrom(s)
    return msg


def response_body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


async def exchange(
    target: str,
    messages: list[pb.ProcessingRequest],
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options=(),
) -> list[pb.ProcessingResponse]:
    """Send `messages` on one stream, half-close, and return every answer."""
    channel = (
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = pbg.ExternalProcessorStub(channel)

        async def requests():
            for m in messages:
                yield m

        return [r async for r in stub.Process(requests())]


def set_headers(resp: pb.ProcessingResponse, phase: str = "request_headers") -> dict[str, str]:
    common = getattr(resp, phase).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def lb_metadata(resp: pb.ProcessingResponse) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(resp.dynamic_metadata)


def streamed_bodies(responses, phase: str = "request_body") -> list[tuple[bytes, bool]]:
    out = []
    for r in responses:
        if r.WhichOneof("response") == phase:
            sr = getattr(r, phase).response.body_mutation.streamed_response
            out.append((sr.body, sr.end_of_stream))
    return out


def immediate(responses) -> tuple[int, dict] | None:
    for r in responses:
        if r.WhichOneof("response") == "immediate_response":
            return r.immediate_response.status.code, json.loads(r.immediate_response.body)
    return None


async def process(servicer, messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    """Run one stream through an in-process servicer (epp.extproc.ExternalProcessor), as its
    gRPC server would, without the network: for suites that send thousands of streams."""

    async def requests():
        for m in messages:
            yield m

    return [r async for r in servicer.Process(requests(), None)]
