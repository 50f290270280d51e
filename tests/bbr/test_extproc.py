"""The router's ext_proc stream with real protocol messages (tests/extproc_client.py): the pool
in the header and a route re-match, the body echoed unchanged, a client's copy of the header
never kept, and every bad body a clean 4xx (never a 500), bounded in memory."""

from __future__ import annotations

import io
import json
import logging

import pytest

from infergw.api import logs
from infergw.api.names import MODEL_NAME_HEADER
from infergw.bbr.extproc import BodyRouter
from infergw.epp.response_ids import ResponseIds
from tests import extproc_client as ec
from tests.bbr.objects import route, two_models
from tests.bbr.router_helpers import chat, router, send
from tests.hostile_bodies import HOSTILE, path_of


def count(servicer: BodyRouter, result: str) -> float:
    return servicer.metrics.requests.labels(result)._value.get()


@pytest.mark.parametrize(
    ("model", "pool"), [("chat-7b", "chat"), ("chat-sql", "chat"), ("code-3b", "code")]
)
async def test_the_pool_goes_in_the_header_and_the_body_comes_back_unchanged(model, pool):
    servicer = router()
    body = chat(model) + b" " * 150_000  # several chunks each way
    out = await send(servicer, body, headers={MODEL_NAME_HEADER: "somebody-elses"})
    first = out[0]
    assert first.WhichOneof("response") == "request_headers"
    assert ec.set_headers(first) == {MODEL_NAME_HEADER: pool, "content-length": str(len(body))}
    assert first.request_headers.response.clear_route_cache
    echoed = ec.streamed_bodies(out)
    assert b"".join(b for b, _ in echoed) == body and echoed[-1][1] and len(echoed) > 1
    assert servicer.metrics.routed.labels(pool)._value.get() == 1
    assert servicer.budget.held == 0


async def test_a_model_route_name_is_routed_to_its_pool():
    objects = [*two_models(), route("coder", "coder", [{"modelServerName": "code"}])]
    out = await send(router(objects=objects), chat("coder"))
    assert ec.set_headers(out[0])[MODEL_NAME_HEADER] == "code"


async def test_an_unknown_model_is_404_model_not_found_and_counted():
    servicer = router()
    status, answer = ec.immediate(await send(servicer, chat("gpt-9")))
    assert status == 404
    assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
    assert "gpt-9" in answer["error"]["message"]
    assert servicer.metrics.unknown_models._value.get() == 1
    assert count(servicer, "model_not_found") == 1


async def test_a_huge_model_name_is_not_echoed_whole():
    status, answer = ec.immediate(await send(router(), chat("a" * 500_000)))
    assert status == 404 and len(json.dumps(answer)) < 4096


async def test_a_bodyless_request_passes_with_a_clients_header_removed():
    servicer = router()
    out = await ec.process(
        servicer,
        [ec.headers("/v1/responses/resp_1", eos=True, extra={MODEL_NAME_HEADER: "code"})],
    )
    mutation = out[0].request_headers.response.header_mutation
    assert list(mutation.remove_headers) == [MODEL_NAME_HEADER] and not mutation.set_headers
    assert count(servicer, "bodyless") == 1


ENGINE_ID = "resp_0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")],
)
async def test_a_stored_responses_path_goes_to_the_pool_its_id_names(method, suffix):
    """No body names a model: the id does (made by the pool's picker, checked there)."""
    servicer = router()
    made = ResponseIds(b"k" * 32).stamp("default/code", "code-0", 8000, ENGINE_ID)
    extra = {":method": method, MODEL_NAME_HEADER: "chat"}
    out = await ec.process(
        servicer, [ec.headers(f"/v1/responses/{made}{suffix}?x=1", eos=True, extra=extra)]
    )
    assert ec.set_headers(out[0]) == {MODEL_NAME_HEADER: "code"}
    assert out[0].request_headers.response.clear_route_cache
    assert servicer.metrics.routed.labels("code")._value.get() == 1
    assert count(servicer, "routed") == 1 and count(servicer, "bodyless") == 0


async def test_an_engines_own_response_id_passes_without_the_header():
    extra = {":method": "GET", MODEL_NAME_HEADER: "code"}
    out = await ec.process(
        router(), [ec.headers(f"/v1/responses/{ENGINE_ID}", eos=True, extra=extra)]
    )
    mutation = out[0].request_headers.response.header_mutation
    assert list(mutation.remove_headers) == [MODEL_NAME_HEADER] and not mutation.set_headers


async def test_a_response_id_of_a_pool_not_served_here_or_made_up_is_404():
    gone = ResponseIds(None).stamp("default/gone", "gone-0", 8000, ENGINE_ID)
    for bad, why in ((gone, "InferencePool gone"), ("resp_ig.x.y." + ENGINE_ID, "not one")):
        servicer = router()
        get = {":method": "GET"}
        out = await ec.process(servicer, [ec.headers(f"/v1/responses/{bad}", eos=True, extra=get)])
        status, error = ec.immediate(out)
        assert status == 404 and error["error"]["code"] == "response_not_found", error
        assert why in error["error"]["message"]
        assert "conversation" in error["error"]["message"]  # what to do next
        assert count(servicer, "response_not_found") == 1 and count(servicer, "bodyless") == 0


async def test_the_router_lists_every_name_served_on_its_gateway():
    coder = route("coder", "coder", [{"inferencePoolName": "code"}])
    servicer = router(objects=[*two_models(), coder])
    get = {":method": "GET"}
    out = await ec.process(servicer, [ec.headers("/v1/models", eos=True, extra=get)])
    status, listing = ec.immediate(out)
    assert status == 200 and listing["object"] == "list"
    assert [c["id"] for c in listing["data"]] == ["chat-7b", "chat-sql", "code-3b", "coder"]
    assert all(c["object"] == "model" and c["owned_by"] == "default" for c in listing["data"])
    out = await ec.process(servicer, [ec.headers("/v1/models/coder", eos=True, extra=get)])
    assert ec.immediate(out) == (200, listing["data"][3])
    out = await ec.process(servicer, [ec.headers("/v1/models/nope", eos=True, extra=get)])
    status, error = ec.immediate(out)
    assert status == 404 and error["error"]["code"] == "model_not_found"


# What the picker refuses in fields the router does not read: the pool's picker answers 400.
PICKERS_TO_REFUSE = {
    "empty messages",
    "stream_options not an object",
    "stream_options twice, one with escapes",
}


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - PICKERS_TO_REFUSE))
async def test_a_hostile_body_is_a_clean_400(name):
    # The bodies ask for model "m": known here, so only the body can be wrong.
    servicer = router(objects=[*two_models(), route("m", "m", [{"modelServerName": "chat"}])])
    status, answer = ec.immediate(await send(servicer, HOSTILE[name], path_of(name)))
    assert status == 400 and answer["error"]["code"] == 400
    assert count(servicer, "bad_request") == 1 and servicer.budget.held == 0


@pytest.mark.parametrize(
    "body", [b"not json", b"{}", b'{"model": 7}', b'{"model": ""}', HOSTILE["model twice"]]
)
async def test_with_pass_a_body_it_cannot_route_goes_on_without_the_header(body):
    servicer = router(pass_bad_bodies=True)
    out = await send(servicer, body, headers={MODEL_NAME_HEADER: "chat"})
    assert ec.immediate(out) is None
    assert list(out[0].request_headers.response.header_mutation.remove_headers) == [
        MODEL_NAME_HEADER
    ]
    assert b"".join(b for b, _ in ec.streamed_bodies(out)) == body
    assert count(servicer, "passed_through") == 1


async def test_pass_still_answers_an_unknown_model_404():
    out = await send(router(pass_bad_bodies=True), chat("nobody"))
    assert ec.immediate(out)[0] == 404


async def test_a_body_over_the_limit_is_413_before_it_is_all_held():
    servicer = router(limit=100_000)
    status, _ = ec.immediate(await send(servicer, chat("chat-7b") + b" " * 200_000))
    assert status == 413 and servicer.budget.held == 0
    assert count(servicer, "too_large") == 1


async def test_bodies_beyond_the_budget_are_429_with_retry_after():
    servicer = router(budget=50_000, limit=40_000)
    out = await send(servicer, chat("chat-7b") + b" " * 30_000)  # body + its copy > budget
    status, _ = ec.immediate(out)
    assert status == 429 and servicer.budget.held == 0
    answer = out[-1].immediate_response
    assert {h.header.key: h.header.raw_value for h in answer.headers.set_headers}[
        "retry-after"
    ] == b"1"


async def test_the_answer_is_passed_back_unchanged_if_a_proxy_sends_it():
    out = await ec.process(router(), [ec.response_headers(), ec.response_body(b"data", eos=True)])
    assert out[0].WhichOneof("response") == "response_headers"
    assert ec.streamed_bodies(out, "response_body") == [(b"data", True)]


async def test_its_lines_name_the_request_and_never_the_prompt():
    """An unknown model's line (info) carries the request's id and trace id; the chat's
    content is in no line (api/log_context.py, as in the picker)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(logs.LogSettings("json", "DEBUG", "DEBUG"), out)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        body = json.dumps(
            {"model": "gpt-9", "messages": [{"role": "user", "content": "BBR-MARKER-41"}]}
        ).encode()
        headers = {"x-request-id": "bbr-1", "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
        await send(router(), body, headers=headers)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    refused = [ln for ln in lines if "-> 404" in ln["message"]]
    assert refused and (refused[0]["request_id"], refused[0]["trace_id"]) == ("bbr-1", trace)
    assert "BBR-MARKER-41" not in out.getvalue()
