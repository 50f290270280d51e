"""Hostile request bodies at the picker's edge: every one is a 4xx with the OpenAI-style error
(never a 500), memory stays within a few times the body, the bytes held by all streams at
once are budgeted, and tokenizing a large prompt leaves the event loop running.

Bodies go through the real ext_proc stream handler with real protocol messages
(tests/extproc_client.py); tests/test_epp_protocol.py sends a few through a picker process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc

import pytest

from infergw.epp.body_budget import BodyBudget
from infergw.epp.errors import PickerError
from infergw.epp.extproc import ExternalProcessor
from infergw.epp.request import parse_request
from tests import extproc_client as ec
from tests.allocations import peak_allocated
from tests.director_fixtures import make_director
from tests.hostile_bodies import HOSTILE, chat, path_of

LIMIT = 32 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_body_is_400_with_the_openai_error(name):
    with pytest.raises(PickerError) as info:
        parse_request(path_of(name), HOSTILE[name], {}, max_body_bytes=LIMIT)
    assert info.value.status == 400
    error = info.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (b',"max_tokens":-1', "max_tokens"),
        (b',"max_completion_tokens":' + b"9" * 30, "max_completion_tokens"),
        (b',"stream_options":{"include_usage":"yes"}', "stream_options.include_usage"),
    ],
)
def test_the_error_names_the_field_in_param(extra, param):
    with pytest.raises(PickerError) as info:
        parse_request("/v1/chat/completions", chat(extra=extra), {}, max_body_bytes=LIMIT)
    assert info.value.param == param and info.value.body()["error"]["param"] == param


async def stream_answer(servicer, body: bytes, path: str, chunk: int = 62_000):
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [ec.headers(path)]
    messages += [ec.body(p, eos=i == len(parts) - 1) for i, p in enumerate(parts)]
    return await ec.process(servicer, messages)


async def test_a_huge_model_name_is_neither_echoed_nor_logged_whole(caplog):
    """A 5 MB model name came back whole in the 404 and in the picker's log line, for every
    such request: answers and logs quote what a client sent, bounded."""
    director = make_director(fallbacks=0)
    for endpoint in director.datastore.endpoints():  # their model lists are known: only m
        endpoint.models = frozenset({"m"})
    body = b'{"model":"' + b"a" * 1_000_000 + b'","prompt":"x"}'
    with caplog.at_level(logging.INFO, logger="epp"):
        out = await stream_answer(ExternalProcessor(director), body, "/v1/completions")
    status, answer = ec.immediate(out)
    assert status == 404 and "not served" in answer["error"]["message"]
    assert len(json.dumps(answer)) < 4096
    assert caplog.records and all(len(r.getMessage()) < 4096 for r in caplog.records)


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_body_through_the_stream_is_an_immediate_400(name):
    director = make_director(fallbacks=0)
    out = await stream_answer(ExternalProcessor(director), HOSTILE[name], path_of(name))
    status, body = ec.immediate(out)
    assert status == 400 and body["error"]["code"] == 400
    assert all(
        e.inflight_tokens == 0 and e.inflight_requests == 0 for e in director.datastore.endpoints()
    )


async def test_a_bad_max_tokens_leaves_no_pod_with_inflight_tokens():
    from infergw.epp.extproc import _Stream

    director = make_director(fallbacks=0)

    def inflight() -> int:
        return sum(e.inflight_tokens for e in director.datastore.endpoints())

    for value in (b"-1000000000000000000", b"1" + b"0" * 18, b"9" * 400, b"16"):
        stream = _Stream(director)
        stream.on_request_headers(ec.headers())
        body = b'{"model":"m","prompt":"x","max_tokens":' + value + b"}"
        try:
            await stream.on_request_body(ec.body(body))
            assert inflight() == 1 + 16  # the prompt's estimate and its max_tokens
        except PickerError as exc:
            assert exc.status == 400 and value != b"16"
        finally:
            stream.close()
        assert inflight() == 0


# ---- memory --------------------------------------------------------------------------------

FOUR_MIB = 4 * 1024 * 1024


def empty_objects(n_bytes: int) -> bytes:
    items = b",".join([b"{}"] * (n_bytes // 3))
    return b'{"model":"m","messages":[' + items + b"]}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_parsing_a_4_mib_body_of_empty_objects_stays_within_4x_its_size(path):
    body = empty_objects(FOUR_MIB)
    field = {"/v1/completions": b'"prompt"', "/v1/embeddings": b'"input"'}.get(path)
    if field:
        body = body.replace(b'"messages"', field)
    kept = []
    peak = peak_allocated(lambda: kept.append(parse_request(path, body, {}, max_body_bytes=LIMIT)))
    assert peak < 4 * len(body)
    assert kept[0].held_bytes < 3 * len(body)


async def test_a_4_mib_body_through_the_stream_stays_within_4x_its_size():
    director = make_director(fallbacks=0)
    servicer = ExternalProcessor(director)
    body = empty_objects(FOUR_MIB)
    parts = [body[i : i + 62_000] for i in range(0, len(body), 62_000)]
    messages = [ec.headers("/v1/chat/completions")]
    messages += [ec.body(p, eos=i == len(parts) - 1) for i, p in enumerate(parts)]
    del parts
    tracemalloc.start()
    try:
        out = await ec.process(servicer, messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ec.immediate(out) is None  # routed
    assert b"".join(body for body, _ in ec.streamed_bodies(out)) == body
    # The answers hold one more copy of the body (the chunks sent on): 4x covers them.
    assert peak < 4 * len(body)


# ---- the budget for bytes held across streams -----------------------------------------------


class Gate:
    """An async iterator of stream messages that stops until released: a body in flight."""

    def __init__(self, first: list, rest: list) -> None:
        self.first, self.rest = first, rest
        self.sent_first = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self):
        for m in self.first:
            yield m
        self.sent_first.set()
        await self.release.wait()
        for m in self.rest:
            yield m


async def test_bodies_over_the_budget_of_all_streams_are_429_with_retry_after():
    director = make_director(fallbacks=0)
    budget = BodyBudget(250_000)
    servicer = ExternalProcessor(director, budget)
    # A body costs its bytes, room for what parsing may build beside them while it runs
    # (PARSE_OVERHEAD x its size: 200,000 more), and once parsed its prompt's text: ~80,000.
    prompt = json.dumps({"model": "m", "prompt": "x" * 40_000}).encode()
    # One stream holds 30,000 bytes of an unfinished body...
    held = Gate([ec.headers(), ec.body(prompt[:30_000], eos=False)], [ec.body(prompt[30_000:])])
    first = asyncio.create_task(_collect(servicer.Process(held.__aiter__(), None)))
    await held.sent_first.wait()
    await asyncio.sleep(0)
    assert budget.held == 30_000
    # ...so another body does not fit.
    out = await stream_answer(servicer, prompt, "/v1/completions", chunk=20_000)
    status, body = ec.immediate(out)
    assert status == 429 and body["error"]["code"] == 429
    sets = out[-1].immediate_response.headers.set_headers
    assert {h.header.key: h.header.raw_value for h in sets}["retry-after"] == b"1"
    assert budget.held == 30_000  # the refused stream gave back what it had taken
    held.release.set()
    routed = await first
    assert ec.immediate(routed) is None
    assert budget.held == 0  # each stream gives back all it took when it ends
    out = await stream_answer(servicer, prompt, "/v1/completions")
    assert ec.immediate(out) is None


async def test_the_budget_bounds_what_parsing_builds_not_only_what_it_keeps():
    """A prompt with one character outside the BMP is held as text at 4 bytes a character:
    a 1 MB body would build ~4 MB before the budget saw it. The room is taken first, so a
    request the budget cannot carry is refused before its text exists."""
    director = make_director(fallbacks=0)
    size = 1_000_000
    body = json.dumps({"model": "m", "prompt": "\U0001f600" + "x" * size}).encode()
    servicer = ExternalProcessor(director, BodyBudget(3 * len(body)))
    messages = [ec.headers("/v1/completions"), ec.body(body)]
    tracemalloc.start()
    try:
        out = await ec.process(servicer, messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    status, _ = ec.immediate(out)
    assert status == 429
    assert peak < 3 * len(body)  # the body and its copies, never the 4-byte text
    assert servicer.budget.held == 0
    # With room for the text, it is routed, and the stream keeps only what it holds.
    roomy = ExternalProcessor(director, BodyBudget(10 * len(body)))
    assert ec.immediate(await ec.process(roomy, messages)) is None
    assert roomy.budget.held == 0


async def _collect(answers):
    return [a async for a in answers]


def test_the_budget_flag_reaches_the_picker_options():
    from infergw.epp.body_budget import DEFAULT_MAX_HELD_BYTES
    from infergw.epp.options import parse_options

    base = ["--pool-name", "pool", "--pool-file", "pool.yaml"]
    assert parse_options(base).max_held_request_bytes == DEFAULT_MAX_HELD_BYTES
    flag = ["--max-held-request-bytes", "1000"]
    assert parse_options(base + flag).max_held_request_bytes == 1000


# ---- tokenizing a large prompt leaves the event loop running --------------------------------


async def test_a_large_prompt_is_tokenized_while_the_event_loop_runs():
    from infergw.epp.context import RequestContext
    from infergw.epp.director import Director, DirectorOptions
    from infergw.epp.gatekeeper import Gatekeeper
    from infergw.epp.metrics import PickerMetrics
    from infergw.epp.scheduling.config import load_config
    from infergw.epp.tokenizing import ModelTokenizers
    from infergw.kvindex.tokenize import PromptTokenizers
    from infergw.stack.local import DEFAULT_MODEL_DIR
    from tests.director_fixtures import LEAST_REQUEST, SERVERS, limited_route, make_datastore

    ds = make_datastore()
    ds.set_routes(limited_route(inputTokensPerUnit=10**9), SERVERS)
    metrics = PickerMetrics()
    prompts = ModelTokenizers(PromptTokenizers({"m": DEFAULT_MODEL_DIR}))
    gate = Gatekeeper(metrics.registry, prompts=prompts)
    director = Director(ds, load_config(LEAST_REQUEST), metrics, DirectorOptions(fallbacks=0), gate)
    words = " ".join(f"w{i}" for i in range(100_000))  # under MAX_TOKENIZED_BYTES
    body = json.dumps({"model": "m", "prompt": words}).encode()
    ctx = RequestContext(parse_request("/v1/completions", body, {}, max_body_bytes=LIMIT))
    ticks = 0
    admitted = asyncio.create_task(director.handle(ctx))

    while not admitted.done():  # the loop turns while the prompt is being tokenized
        ticks += 1
        await asyncio.sleep(0)
    await admitted
    assert ticks > 1
    counted = (
        PromptTokenizers({"m": DEFAULT_MODEL_DIR})
        .get("m")
        .tokens_for("completions", {"prompt": words})
    )
    # Counted by the tokenizer, not estimated, and kept in the context.
    assert gate.input_tokens(ctx) == len(counted) == len(ctx.tokens.ids)


async def test_a_queued_request_costs_the_bytes_it_holds_not_only_its_body():
    from infergw.epp.flowcontrol import FlowControlConfig
    from tests.director_fixtures import context, director_with

    ctx = context(prompt="x" * 4000)
    req = ctx.request
    limit = len(req.raw_body) + 100  # the body fits; the body and its prompt text do not
    assert len(req.raw_body) < limit < req.held_bytes
    director = director_with(flow_control=FlowControlConfig(max_bytes=limit))
    for ep in director.datastore.endpoints():
        ep.metrics.waiting, ep.metrics.updated_at = 10, 1e18  # saturated: requests queue
    with pytest.raises(PickerError) as info:
        await director.handle(ctx)
    assert f"cannot take {req.held_bytes} more bytes" in info.value.message


async def test_answers_buffered_for_their_usage_are_charged_and_dropped_past_the_budget():
    from infergw.epp.extproc import _Stream

    director = make_director(fallbacks=0)
    budget = BodyBudget(1_000_000)
    usage = b'{"usage":{"prompt_tokens":3,"completion_tokens":2},"pad":"'
    streams = []
    for _ in range(3):  # three answers of 400,000 bytes buffered at once do not fit
        stream = _Stream(director, budget)
        stream.on_request_headers(ec.headers())
        await stream.on_request_body(ec.body({"model": "m", "prompt": "x"}))
        stream.on_response_headers(ec.response_headers(200, "application/json"))
        stream.on_response_body(ec.response_body(usage + b"p" * 400_000, eos=False))
        streams.append(stream)
        assert budget.held <= budget.limit
    assert streams[0].response.held_bytes > 400_000 and streams[2].response.held_bytes == 0
    for stream in streams:
        stream.on_response_body(ec.response_body(b'"}', eos=True))
        stream.close()
    assert streams[0].usage.usage.completion_tokens == 2  # read: it fitted
    assert streams[2].usage.usage.completion_tokens is None  # not read, and counted:
    counted = director.metrics.registry.get_sample_value(
        "infergate_epp_protocol_errors_total", {"reason": "response_over_budget"}
    )
    assert counted == 1
    assert budget.held == 0
