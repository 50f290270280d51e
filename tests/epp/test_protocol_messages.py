"""The picker's ext_proc answers, built field by field on the hot path, are the messages the
protocol's nested form describes: byte for byte, empty chunks and bare mutations included."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from infergw.api.names import DESTINATION_HEADER, PREFILLER_HEADER, SERVED_HEADER, SUBSET_HEADER
from infergw.epp import protocol

OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=key, raw_value=value.encode()), append_action=OVERWRITE
    )


def body_answer(data: bytes, eos: bool) -> pb.BodyResponse:
    streamed = pb.StreamedBodyResponse(body=data, end_of_stream=eos)
    return pb.BodyResponse(
        response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=streamed))
    )


@pytest.mark.parametrize(
    ("targets", "length", "extra"),
    [
        (["10.0.0.1:8000", "10.0.0.2:8000"], 312, None),
        (["10.0.0.1:8000"], None, {PREFILLER_HEADER: "10.0.0.9:8000", "x-t": "5"}),
        ([], 0, {}),
    ],
)
def test_destination_answer(targets, length, extra):
    value = ",".join(targets)
    sets = [header(DESTINATION_HEADER, value)]
    if length is not None:
        sets.append(header("content-length", str(length)))
    sets += [header(k, v) for k, v in (extra or {}).items()]
    removed = [SUBSET_HEADER, SERVED_HEADER]
    if not (extra and PREFILLER_HEADER in extra):
        removed.append(PREFILLER_HEADER)
    want = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=sets, remove_headers=removed),
                clear_route_cache=True,
            )
        ),
    )
    metadata = struct_pb2.Struct()
    metadata.update({protocol.LB_NAMESPACE: {DESTINATION_HEADER: value}})
    want.dynamic_metadata.CopyFrom(metadata)
    got = protocol.destination_headers(targets, length, extra)
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    ("data", "eos"), [(b"", False), (b"", True), (b"abc", False), (b"x", True)]
)
def test_body_chunks(data, eos):
    got = protocol.response_chunk(data, eos)
    assert got == pb.ProcessingResponse(response_body=body_answer(data, eos))
    (echoed,) = protocol.request_body_chunks(data) if data else protocol.request_body_chunks(b"")
    assert echoed == pb.ProcessingResponse(request_body=body_answer(data, True))


@pytest.mark.parametrize("served", [None, "10.0.0.1:8000"])
def test_served_answer(served):
    sets = [header(SERVED_HEADER, served)] if served else []
    want = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=sets))
        )
    )
    got = protocol.served_headers(served)
    assert got == want
    assert got.response_headers.response.HasField("header_mutation")
