"""The floor a Python ext_proc server sets: a grpc.aio ExternalProcessor that does nothing but
the protocol. It answers request headers with a fixed destination and echoes every body chunk
(FULL_DUPLEX_STREAMED, as Envoy streams them both ways to the picker), with the picker's gRPC
options, TLS setting and event loop, so `bench/epp_overhead` can put the picker beside it
through one Envoy.

python -m infergw.bench.extproc_stub --port P --destination ip:port[,ip:port] [--cert-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from infergw.api.names import DESTINATION_HEADER

# The picker's (epp/app.py GRPC_MAX_MESSAGE_BYTES); bench may not import the picker.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _headers_answer(destination: str) -> pb.ProcessingResponse:
    header = core.HeaderValue(key=DESTINATION_HEADER, raw_value=destination.encode())
    mutation = pb.HeaderMutation(set_headers=[core.HeaderValueOption(header=header)])
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        )
    )


def _echo(kind: str, chunk: pb.HttpBody) -> pb.ProcessingResponse:
    streamed = pb.StreamedBodyResponse(body=chunk.body, end_of_stream=chunk.end_of_stream)
    mutation = pb.BodyMutation(streamed_response=streamed)
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    return pb.ProcessingResponse(**{kind: body})


class Stub(pbg.ExternalProcessorServicer):
    def __init__(self, destinations: list[str]) -> None:
        self._answers = itertools.cycle([_headers_answer(d) for d in destinations])

    async def Process(self, request_iterator, context):
        async for msg in request_iterator:
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                yield next(self._answers)
            elif kind == "request_body":
                yield _echo("request_body", msg.request_body)
            elif kind == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind == "response_body":
                yield _echo("response_body", msg.response_body)
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


async def serve(port: int, destinations: list[str], cert_dir: Path | None) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pbg.add_ExternalProcessorServicer_to_server(Stub(destinations), server)
    address = f"127.0.0.1:{port}"
    if cert_dir is not None:
        key, cert = (cert_dir / "tls.key").read_bytes(), (cert_dir / "tls.crt").read_bytes()
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m infergw.bench.extproc_stub", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--destination", required=True, help="ip:port, or several comma-separated")
    p.add_argument("--cert-dir", type=Path, help="tls.crt and tls.key: serve TLS, as the picker")
    args = p.parse_args(argv)
    coro = serve(args.port, args.destination.split(","), args.cert_dir)
    # The picker's event loop: uvloop unless INFERGATE_EVENT_LOOP says otherwise (epp/app.py).
    if os.environ.get("INFERGATE_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
