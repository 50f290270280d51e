"""A request body that stalls (slowloris) is answered 408 by the picker and the body-based
router over a real gRPC stream, its bytes given back; the wait after the body's end (a pod to
start, the answer) is not bounded by it."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from infergw.epp.body_budget import BodyBudget
from infergw.epp.extproc import ExternalProcessor
from tests import extproc_client as ec
from tests.bbr.router_helpers import router
from tests.director_fixtures import cold_director, make_director, pod

BOUND = 0.5  # the body timeout under test, seconds
GENEROUS = 30.0  # how long a test waits for an answer before failing
HALF = b'{"model": "m", "prompt": "a slow'  # a body that never ends
BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}


@contextlib.asynccontextmanager
async def serving(servicer):
    server = grpc.aio.server()
    pbg.add_ExternalProcessorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pbg.ExternalProcessorStub(channel)
    finally:
        await server.stop(None)


async def stalled_stream(stub, path="/v1/completions"):
    """Headers and part of a body, then nothing (the stream stays open): the first answer."""
    gone = asyncio.Event()

    async def requests():
        yield ec.headers(path)
        yield ec.body(HALF, eos=False)
        await gone.wait()  # the client neither sends more nor leaves

    call = stub.Process(requests())
    try:
        return await asyncio.wait_for(call.read(), GENEROUS)
    finally:
        gone.set()
        call.cancel()


def immediate_of(resp: pb.ProcessingResponse) -> tuple[int, dict]:
    assert resp.WhichOneof("response") == "immediate_response", resp
    return resp.immediate_response.status.code, json.loads(resp.immediate_response.body)


def protocol_errors(director, reason: str) -> float:
    value = director.metrics.registry.get_sample_value(
        "infergate_epp_protocol_errors_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_stalled_body_is_answered_408_and_its_bytes_given_back(caplog):
    director = make_director(request_body_timeout=BOUND)
    budget = BodyBudget()
    async with serving(ExternalProcessor(director, budget)) as stub:
        with caplog.at_level("INFO", logger="epp.extproc"):
            status, body = immediate_of(await stalled_stream(stub))
    assert status == 408
    assert body["error"]["type"] == "RequestTimeout"
    assert f"after {len(HALF)} bytes" in body["error"]["message"]
    assert budget.held == 0  # the stream ended and gave its body back
    assert protocol_errors(director, "body_timeout") == 1
    line = next(r.getMessage() for r in caplog.records if "408" in r.getMessage())
    assert "/v1/completions" in line and f"{len(HALF)} bytes" in line, line


async def test_no_bound_with_the_timeout_off():
    director = make_director(request_body_timeout=0)
    async with serving(ExternalProcessor(director)) as stub:
        with pytest.raises(TimeoutError):
            # Nothing answers: the stream waits for the body's end (here for 3 bounds).
            gone = asyncio.Event()

            async def requests():
                yield ec.headers()
                yield ec.body(HALF, eos=False)
                await gone.wait()

            call = stub.Process(requests())
            try:
                await asyncio.wait_for(call.read(), 3 * BOUND)
            finally:
                gone.set()
                call.cancel()


async def test_a_body_sent_slowly_within_the_bound_passes():
    director = make_director(request_body_timeout=BOUND)
    raw = json.dumps(BODY).encode()

    async def requests():
        yield ec.headers()
        for i in range(0, len(raw), 8):  # each gap well inside the bound, all past it
            await asyncio.sleep(BOUND / 5)
            yield ec.body(raw[i : i + 8], eos=i + 8 >= len(raw))

    async with serving(ExternalProcessor(director)) as stub:
        answers = [r async for r in stub.Process(requests())]
    assert ec.immediate(answers) is None
    assert answers[0].WhichOneof("response") == "request_headers"


async def test_a_wait_for_a_pod_after_the_body_ended_is_not_cut():
    # The body ends, then the request waits (scaled to zero) for 4 bounds: a pod comes and it
    # is scheduled; the answer then takes as long again before its headers.
    director = cold_director(ttl=GENEROUS)
    director.options.request_body_timeout = BOUND
    ready = asyncio.Event()

    async def requests():
        yield ec.headers()
        yield ec.body(BODY)
        await ready.wait()
        await asyncio.sleep(4 * BOUND)  # a slow first answer byte
        yield ec.response_headers(served="10.0.0.1:8000", eos=True)

    async def pod_starts():
        await asyncio.sleep(4 * BOUND)
        director.datastore.replace_pods([pod("a", "10.0.0.1")])

    async with serving(ExternalProcessor(director)) as stub:
        starting = asyncio.create_task(pod_starts())
        call = stub.Process(requests())
        first = await asyncio.wait_for(call.read(), GENEROUS)
        ready.set()
        rest = []
        while (r := await asyncio.wait_for(call.read(), GENEROUS)) is not grpc.aio.EOF:
            rest.append(r)
        await starting
    assert first.WhichOneof("response") == "request_headers", first
    assert ec.immediate(rest) is None
    assert rest[-1].WhichOneof("response") == "response_headers"


async def test_the_body_based_router_answers_a_stalled_body_408():
    servicer = router(body_timeout=BOUND)
    async with serving(servicer) as stub:
        status, body = immediate_of(await stalled_stream(stub, "/v1/chat/completions"))
    assert status == 408, body
    assert f"after {len(HALF)} bytes" in body["error"]["message"]
    assert servicer.budget.held == 0
