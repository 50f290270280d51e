"""SIGTERM drains the picker: health turns NOT_SERVING, a stream already open finishes
(within --grace-period), then the picker exits 0 — tested on a real picker process with this
test playing Envoy."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import extproc_client as ec
from tests.conftest import simulators
from tests.picker_fixtures import COMPLETION, Picker

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEADERS_SEEN = 'infergate_epp_extproc_messages_total{kind="request_headers"}'


@pytest.fixture
def sim():
    with simulators(1) as [port]:
        yield port


class OpenStream:
    """One ext_proc stream whose messages the test sends one at a time."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.answers = pbg.ExternalProcessorStub(self.channel).Process(self._messages())

    async def _messages(self):
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def send(self, msg) -> None:
        await self.outbox.put(msg)

    async def answer(self):
        return await self.answers.read()

    async def close(self) -> None:
        await self.outbox.put(None)  # half-close, as Envoy does at the end of a request
        await self.channel.close()


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


async def _until_not_serving(port: int) -> None:
    while await _health(port) != NOT_SERVING:
        await asyncio.sleep(0.05)


async def _until_received_headers(picker: Picker) -> None:
    """Until the picker has read a request's headers: the stream is open on its side."""
    while not any(
        float(line.rsplit(" ", 1)[1]) >= 1
        for line in await asyncio.to_thread(picker.metric_lines, HEADERS_SEEN)
    ):
        await asyncio.sleep(0.05)


def _health_port(picker: Picker) -> int:
    return int(picker.cmd[picker.cmd.index("--grpc-health-port") + 1])


async def test_sigterm_lets_an_open_stream_finish_then_exits_0(sim, tmp_path):
    picker = Picker(tmp_path, [sim], extra=["--grace-period", "60s"])
    with picker.run() as proc:
        assert await _health(_health_port(picker)) == health_pb2.HealthCheckResponse.SERVING
        stream = OpenStream(picker.target)
        await stream.send(ec.headers())  # a request is on its way: headers, body to follow
        await asyncio.wait_for(_until_received_headers(picker), 30)
        os.kill(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(_until_not_serving(_health_port(picker)), 30)
        assert proc.poll() is None  # still serving the stream it has
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # but no new one
            await ec.exchange(picker.target, [ec.headers(), ec.body(COMPLETION)])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        await stream.send(ec.body(COMPLETION))
        routed = await stream.answer()
        assert ec.set_headers(routed)["x-gateway-destination-endpoint"] == f"127.0.0.1:{sim}"
        await stream.send(ec.response_headers(served=f"127.0.0.1:{sim}"))
        await stream.send(ec.response_body(b'{"usage": {"completion_tokens": 1}}', eos=True))
        await stream.close()

        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_the_grace_period_bounds_the_drain(sim, tmp_path):
    """A stream that never ends does not keep the picker alive past --grace-period."""
    picker = Picker(tmp_path, [sim], extra=["--grace-period", "1s"])
    with picker.run() as proc:
        stream = OpenStream(picker.target)
        await stream.send(ec.headers())
        await asyncio.wait_for(_until_received_headers(picker), 30)
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        with pytest.raises(grpc.aio.AioRpcError):
            await stream.answer()
        await stream.close()
