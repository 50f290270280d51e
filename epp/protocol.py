"""Building ext_proc messages for the endpoint-picker protocol.

Names and limits follow the Gateway API Inference Extension's protocol: the destination goes
in a header *and* in `envoy.lb` dynamic metadata with the same comma-separated list, bodies
go back in chunks of at most 62,000 bytes, errors are ImmediateResponses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from infergw.api.names import DESTINATION_HEADER, PREFILLER_HEADER, SERVED_HEADER, SUBSET_HEADER

LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
MAX_CHUNK = 62_000
# The body mode with which no body passes through the ext_proc server.
BODY_NONE = processing_mode_pb2.ProcessingMode.NONE
# Never passed on from the client: the picker alone decides where a request goes.
SYSTEM_HEADERS = frozenset({DESTINATION_HEADER, SUBSET_HEADER, SERVED_HEADER, "content-length"})

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Headers removed on the way to the pod. Only the picker names a prefiller: a client's would
# make the decode sidecar send its prompt wherever the client said.
_KEEP_PREFILLER = (SUBSET_HEADER, SERVED_HEADER)
_REMOVE_PREFILLER = (*_KEEP_PREFILLER, PREFILLER_HEADER)


def header_map(headers: core.HeaderMap) -> dict[str, str]:
    """Envoy sends values in raw_value (bytes) or, older, in value."""
    out = {}
    for h in headers.headers:
        raw = h.raw_value
        out[h.key.lower()] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _set(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


# The builders below set fields along their paths on one message (each sub-message made as it
# is first touched) rather than nesting constructors: about half the CPU, the same message.


def _add_set(sets, key: str, value: str) -> None:
    option = sets.add()
    option.header.key = key
    option.header.raw_value = value.encode()
    option.append_action = _OVERWRITE


def destination_headers(
    targets: list[str], content_length: int | None, extra: dict[str, str] | None = None
) -> pb.ProcessingResponse:
    """The deferred request-headers answer: where to go, in header and metadata alike, and
    any `extra` headers for the pod."""
    value = ",".join(targets)
    resp = pb.ProcessingResponse()
    common = resp.request_headers.response
    mutation = common.header_mutation
    sets = mutation.set_headers
    _add_set(sets, DESTINATION_HEADER, value)
    if content_length is not None:
        _add_set(sets, "content-length", str(content_length))
    if extra:
        for k, v in extra.items():
            _add_set(sets, k, v)
    keep = extra and PREFILLER_HEADER in extra
    mutation.remove_headers.extend(_KEEP_PREFILLER if keep else _REMOVE_PREFILLER)
    common.clear_route_cache = True
    # What Struct.update builds from {LB_NAMESPACE: {DESTINATION_HEADER: value}}, set directly.
    lb = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value
    lb.fields[DESTINATION_HEADER].string_value = value
    return resp


def request_body_chunks(body: bytes) -> Iterator[pb.ProcessingResponse]:
    """The request body, echoed in streamed chunks of at most MAX_CHUNK bytes, each built
    when it is asked for (a multi-MiB body is not copied into messages all at once)."""
    if not body:
        yield _request_chunk(b"", True)
        return
    last = len(body) - 1
    for i in range(0, len(body), MAX_CHUNK):
        yield _request_chunk(body[i : i + MAX_CHUNK], i + MAX_CHUNK > last)


def _request_chunk(data: bytes, eos: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    _streamed(resp.request_body, data, eos)
    return resp


def _streamed(answer: pb.BodyResponse, data: bytes, eos: bool) -> None:
    streamed = answer.response.body_mutation.streamed_response
    streamed.body = data
    streamed.end_of_stream = eos  # setting a field marks the path to it present, even empty


def response_body_chunks(
    pieces: Sequence[bytes | bytearray], eos: bool
) -> Iterable[pb.ProcessingResponse]:
    """The answer's bytes passed on now, in streamed chunks of at most MAX_CHUNK bytes, each
    built when it is asked for; the last carries `eos`. Nothing to pass on is one empty chunk."""
    if len(pieces) == 1:  # most often: the chunk as it came
        piece = pieces[0]
        if piece and isinstance(piece, bytes) and len(piece) <= MAX_CHUNK:
            return (response_chunk(piece, eos),)
    return _response_body_chunks(pieces, eos)


def _response_body_chunks(
    pieces: Sequence[bytes | bytearray], eos: bool
) -> Iterator[pb.ProcessingResponse]:
    last: bytes | None = None
    for piece in pieces:
        if not piece:
            continue
        if isinstance(piece, bytes) and len(piece) <= MAX_CHUNK:
            slices: Iterator[bytes] = iter((piece,))
        else:
            view = memoryview(piece)
            slices = (bytes(view[i : i + MAX_CHUNK]) for i in range(0, len(piece), MAX_CHUNK))
        for data in slices:
            if last is not None:
                yield response_chunk(last, False)
            last = data
    yield response_chunk(b"" if last is None else last, eos)


def response_chunk(data: bytes, eos: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()  # once a streamed token: _streamed inlined
    streamed = resp.response_body.response.body_mutation.streamed_response
    streamed.body = data
    streamed.end_of_stream = eos
    return resp


def served_headers(served: str | None) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    mutation = resp.response_headers.response.header_mutation
    if served:
        _add_set(mutation.set_headers, SERVED_HEADER, served)
    else:
        mutation.SetInParent()
    return resp


def empty_request_trailers() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def empty_response_trailers() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def immediate(
    status: int,
    body: dict,
    headers: dict[str, str] | None = None,
    *,
    details: str = "infergate_epp",
) -> pb.ProcessingResponse:
    """An answer in place of the pod's; `details` (with the status) is what Envoy's access
    log shows as the response code details: who answered."""
    payload = json.dumps(body).encode()
    sets = [_set("content-type", "application/json")]
    sets += [_set(k, v) for k, v in (headers or {}).items()]
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=sets),
            body=payload,
            details=f"{details}_{status}",
        )
    )


def struct_value(struct: struct_pb2.Struct, key: str):
    """A plain-Python value from a Struct field, or None."""
    if key not in struct.fields:
        return None
    v = struct.fields[key]
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [
            x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"
        ]
    return None


def subset_hint(req: pb.ProcessingRequest) -> list[str] | None:
    """The proxy's endpoint subset, if it sent one: a list, or a comma string."""
    meta = req.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in meta:
        return None
    value = struct_value(meta[SUBSET_NAMESPACE], SUBSET_HEADER)
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [s.strip() for s in items if s.strip()]


def served_endpoint(req: pb.ProcessingRequest) -> str | None:
    """Who answered: envoy.lb metadata (the protocol) or the upstream.address attribute."""
    meta = req.metadata_context.filter_metadata
    if LB_NAMESPACE in meta:
        value = struct_value(meta[LB_NAMESPACE], SERVED_HEADER)
        if isinstance(value, str) and value:
            return value
    for attrs in req.attributes.values():
        value = struct_value(attrs, "upstream.address")
        if isinstance(value, str) and value:
            return value
    return None
