"""epp/stored_responses.py through the director: a Responses API request naming a stored
response goes to the pod (and port) that stored it, with the engine's id in its body or path;
a pod gone, not ready or another pool's id is a clear error, never another pod."""

from __future__ import annotations

import json

import msgspec
import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import PoolSpec
from infergw.epp.errors import PickerError
from infergw.epp.request import parse_request
from infergw.epp.response_ids import REFUSED_NEXT
from infergw.epp.stored_responses import answers_with_response, stores_answer
from tests.director_fixtures import A1, B0, make_director, pod

ENGINE = "resp_0123456789abcdef0123456789abcdef"


@pytest.fixture
def director():
    return make_director(fallbacks=1, response_id_key=b"k" * 32)


def made_at(director, pod_name: str, port: int, engine_id: str = ENGINE) -> str:
    return director.stored.ids.stamp("ns/pool", pod_name, port, engine_id)


def responses_ctx(**body) -> RequestContext:
    raw = json.dumps({"model": "m", "input": "hi", **body}).encode()
    return RequestContext(parse_request("/v1/responses", raw, {}, max_body_bytes=1 << 20))


async def error_of(director, ctx) -> PickerError:
    with pytest.raises(PickerError) as info:
        await director.handle(ctx)
    return info.value


async def test_previous_response_id_goes_to_the_pod_that_stored_it_alone(director):
    for _ in range(20):  # without the id, 4 endpoints and a fallback
        ctx = responses_ctx(previous_response_id=made_at(director, "a", 8001))
        targets = await director.handle(ctx)
        assert [e.address for e in targets] == [A1]
        sent = msgspec.json.decode(ctx.upstream_body())
        assert sent["previous_response_id"] == ENGINE
        assert sent["input"] == "hi" and sent["model"] == "m"


async def test_an_engines_own_id_is_scheduled_as_before(director):
    ctx = responses_ctx(previous_response_id=ENGINE)
    assert len(await director.handle(ctx)) == 2
    assert msgspec.json.decode(ctx.upstream_body())["previous_response_id"] == ENGINE


async def test_a_pod_gone_from_the_pool_is_a_404_that_says_so(director):
    given = made_at(director, "a", 8001)
    director.datastore.replace_pods([pod("b", "10.0.0.2")])
    err = await error_of(director, responses_ctx(previous_response_id=given))
    assert err.status == 404
    body = err.body()["error"]
    assert body["code"] == "response_not_found" and body["param"] == "previous_response_id"
    assert (
        "has left the pool" in body["message"] and "without previous_response_id" in body["message"]
    )


async def test_a_port_gone_from_the_pool_is_gone_too(director):
    given = made_at(director, "a", 8001)
    director.datastore.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000]))
    assert (await error_of(director, responses_ctx(previous_response_id=given))).status == 404


async def test_a_pod_not_ready_is_a_503_to_retry(director):
    given = made_at(director, "a", 8000)
    unready = pod("a", "10.0.0.1")
    unready["status"]["conditions"][0]["status"] = "False"
    director.datastore.replace_pods([unready, pod("b", "10.0.0.2")])
    err = await error_of(director, responses_ctx(previous_response_id=given))
    assert err.status == 503 and err.headers == {"retry-after": "5"}


@pytest.mark.parametrize(
    "given",
    [
        lambda d: d.stored.ids.stamp("ns/other-pool", "a", 8000, ENGINE),
        lambda d: made_at(d, "a", 8000)[:-3] + "fff",
        lambda d: "resp_ig." + "A" * 5000,
    ],
)
async def test_forged_huge_and_other_pools_ids_are_404(director, given):
    err = await error_of(director, responses_ctx(previous_response_id=given(director)))
    assert err.status == 404 and err.body()["error"]["code"] == "response_not_found"
    assert err.message.endswith(REFUSED_NEXT)  # what the client can do about it


async def test_a_previous_response_id_that_is_not_a_string_is_400(director):
    assert (await error_of(director, responses_ctx(previous_response_id=7))).status == 400


def test_a_path_id_goes_to_its_pod_with_the_engines_id(director):
    given = made_at(director, "b", 8000)
    for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/cancel"),
                           ("GET", "/input_items?limit=2")]:  # fmt: skip
        targets, path = director.route_bodyless(method, f"/v1/responses/{given}{suffix}", None)
        assert [e.address for e in targets] == [B0]
        assert path == f"/v1/responses/{ENGINE}{suffix}"
    targets, path = director.route_bodyless("GET", f"/v1/responses/{ENGINE}", None)
    assert path is None and len(targets) == 2  # not ours: any pod, as before


def test_a_path_id_of_a_gone_pod_is_404(director):
    given = made_at(director, "b", 8000)
    director.datastore.replace_pods([pod("a", "10.0.0.1")])
    with pytest.raises(PickerError) as info:
        director.route_bodyless("GET", f"/v1/responses/{given}", None)
    assert info.value.status == 404 and info.value.param is None  # the path named it


def test_which_answers_get_their_ids_stamped():
    def req(path, **body):
        raw = json.dumps({"model": "m", "input": "hi", **body}).encode()
        return parse_request(path, raw, {}, max_body_bytes=1 << 20)

    assert stores_answer(req("/v1/responses"))
    assert stores_answer(req("/openai/v1/responses?x=1"))
    assert stores_answer(req("/v1/responses", store=True))
    assert not stores_answer(req("/v1/responses", store=False))  # the engine keeps nothing
    with pytest.raises(PickerError) as info:
        stores_answer(req("/v1/responses", store="yes"))
    assert info.value.status == 400 and info.value.param == "store"
    assert answers_with_response("GET", "/v1/responses/resp_1")
    assert answers_with_response("POST", "/v1/responses/resp_1/cancel")
    assert not answers_with_response("GET", "/v1/models")


def test_the_engines_id_goes_in_beside_a_rewritten_model():
    raw = b'{"previous_response_id": "resp_ig.x.y.z", "model": "public", "input": "hi"}'
    req = parse_request("/v1/responses", raw, {}, max_body_bytes=1 << 20)
    sent = msgspec.json.decode(req.body_for_upstream("served", previous_response_id=ENGINE))
    assert sent == {"previous_response_id": ENGINE, "model": "served", "input": "hi"}


def test_a_previous_response_id_written_twice_or_escaped_is_400():
    for raw in (
        b'{"model": "m", "input": "hi", "previous_response_id": "a", "previous_response_id": "b"}',
        b'{"model": "m", "input": "hi", "previous_response_\\u0069d": "a"}',
    ):
        with pytest.raises(PickerError) as info:
            parse_request("/v1/responses", raw, {}, max_body_bytes=1 << 20)
        assert info.value.status == 400
