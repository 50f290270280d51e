"""Hostile `/v1/responses/{id}` requests through the real ext_proc stream handler: forged,
truncated, edited, encoded and oversized ids, dot segments, encoded slashes, query strings and
unicode, under GET, DELETE and POST …/cancel. Each must be routed to a pod of the pool — the
one the id names, with the engine's id alone in the path, when it is ours — or answered with
a 4xx and an OpenAI-style error; never a 500, never an address outside the pool."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.api.names import DESTINATION_HEADER
from infergw.epp.body_budget import BodyBudget
from infergw.epp.extproc import ExternalProcessor
from tests import extproc_client as ec
from tests.director_fixtures import A1, make_director
from tests.fuzzing import fuzz_settings

ENGINE = "resp_0123456789abcdef0123456789abcdef"
POOL_ADDRESSES = {"10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001"}


@pytest.fixture(scope="module")
def picker():
    director = make_director(fallbacks=1, response_id_key=b"k" * 32)
    made = director.stored.ids.stamp("ns/pool", "a", 8001, ENGINE)
    return ExternalProcessor(director, BodyBudget(1 << 20)), made


def bodyless(method: str, path: str) -> list:
    return [ec.headers(path, eos=True, extra={":method": method})]


async def answer(servicer, method: str, path: str) -> tuple[int, dict] | tuple[str, dict]:
    out = await ec.process(servicer, bodyless(method, path))
    got = ec.immediate(out)
    if got is not None:
        return got
    assert out[0].WhichOneof("response") == "request_headers", out
    return "routed", ec.set_headers(out[0])


def check(got) -> None:
    status, info = got
    if status == "routed":
        assert set(info[DESTINATION_HEADER].split(",")) <= POOL_ADDRESSES
        if ":path" in info:  # one of ours, its engine id put in (the query is the client's)
            route = info[":path"].partition("?")[0]
            assert "resp_ig." not in route and ENGINE in route
        return
    assert 400 <= status < 500, got
    assert set(info["error"]) == {"message", "type", "param", "code"}


ODD = [
    "{id}",
    "{id}/cancel",
    "{id}/input_items?limit=1&after=resp_ig.x",
    "{id}?stream=true",
    "{id}%2F..%2F..%2Fadmin",
    "{id}/../../admin",
    "{id}/./cancel",
    "..%2F{id}",
    "{id}#frag",
    "{id}%00",
    "{id}\u00e9",
    "{id}/input_items/extra",
    "{id}//cancel",
    "%72esp_ig.{tail}",
]


@fuzz_settings(200)
@given(
    method=st.sampled_from(["GET", "DELETE", "POST", "PUT", "HEAD"]),
    shape=st.sampled_from(ODD),
    edit=st.one_of(
        st.just(None),
        st.tuples(st.integers(0, 100), st.text(max_size=4)),
        st.integers(0, 100),
    ),
)
def test_a_hostile_stored_response_path_is_routed_in_the_pool_or_a_4xx(picker, method, shape, edit):
    servicer, made = picker
    rid = made
    if isinstance(edit, tuple):
        rid = rid[: edit[0]] + edit[1] + rid[edit[0] :]
    elif isinstance(edit, int):
        rid = rid[:edit] + rid[edit + 1 :]
    path = "/v1/responses/" + shape.format(id=rid, tail=rid[len("resp_ig.") :])
    check(asyncio.run(answer(servicer, method, path)))


def test_our_id_goes_to_its_pod_with_the_query_kept(picker):
    servicer, made = picker
    status, info = asyncio.run(answer(servicer, "GET", f"/v1/responses/{made}?stream=true"))
    assert status == "routed" and info[DESTINATION_HEADER] == A1
    assert info[":path"] == f"/v1/responses/{ENGINE}?stream=true"


@pytest.mark.parametrize(
    "rid",
    ["resp_ig.", "resp_ig.x", "resp_ig." + "A" * 5000, "resp_ig.a.b.resp_\u00e9", "resp_ig..."],
)
def test_a_made_up_id_in_a_path_is_a_404(picker, rid):
    servicer, _ = picker
    status, body = asyncio.run(answer(servicer, "GET", f"/v1/responses/{rid}"))
    assert status == 404 and body["error"]["message"]
