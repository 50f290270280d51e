"""What the local Envoy's timeouts count, through the real Envoy with the stack's config and a
processor that holds a request after its body ended (as the picker's queue or a pod's start
does): `request_timeout` stops at the request's end from the client, so it bounds the request
phase alone (a trickled body is 408; the hold is not cut), while the stream idle timeout counts
the hold's silence (504): why it stays off and request_timeout is set (README, "Limits a client
cannot pass")."""

from __future__ import annotations

import asyncio
import copy
import socket

import pytest
import yaml

from infergw.stack.ports import free_port
from tests.e2e.test_extproc_modes import Processor, _envoy_config, envoy_with

pytestmark = pytest.mark.slow

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
