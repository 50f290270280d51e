"""Stored responses belong to the verified user who made them, through the picker's real
ext_proc stream handler: a `POST /v1/responses` answered for user A gets an id bound to A;
`GET`, `DELETE` and `previous_response_id` with it go to its pod for A, and for anyone else
(another user, no user, a user whose name differs by a byte) are refused exactly as a forged
id is — 404 `response_not_found`, naming the field, no hint that the id exists. Without a user
the ids work for anyone, as before."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from infergw.api.names import DESTINATION_HEADER, USER_HEADER
from infergw.epp.body_budget import BodyBudget
from infergw.epp.extproc import ExternalProcessor
from infergw.epp.response_ids import PREFIX
from tests import extproc_client as ec
from tests.director_fixtures import A1, make_director

ENGINE = "resp_0123456789abcdef0123456789abcdef"
HOSTILE_USERS = [
    "u" * 200_000,  # far past any header Envoy would pass
    "a\x00b",
    "a\r\nx-infergate-user: b",
    "\u202eeve",
    "\x1b[2J",
]


@pytest.fixture
def picker() -> ExternalProcessor:
    director = make_director(fallbacks=1, response_id_key=b"k" * 32)
    return ExternalProcessor(director, BodyBudget(1 << 20))


def user_headers(user: str | None) -> dict[str, str]:
    return {USER_HEADER: user} if user is not None else {}


def run(picker, messages) -> list:
    return asyncio.run(ec.process(picker, messages))


def answer_ids(out) -> str:
    """The `id` of the answer the client gets (as the picker stamped it)."""
    answer = b"".join(body for body, _ in ec.streamed_bodies(out, "response_body"))
    return json.loads(answer)["id"]


def create(picker, user: str | None) -> str:
    """A response stored by the pod at A1 for `user`: the id the client gets."""
    out = run(
        picker,
        [
            ec.headers("/v1/responses", extra=user_headers(user)),
            ec.body({"model": "m", "input": "hi"}),
            ec.response_headers(200, served=A1),
            ec.response_body(json.dumps({"id": ENGINE, "object": "response"}).encode(), True),
        ],
    )
    made = answer_ids(out)
    assert made.startswith(PREFIX) and made.endswith(ENGINE)
    return made


def by_path(picker, method: str, rid: str, user: str | None) -> list:
    extra = {":method": method, **user_headers(user)}
    return run(picker, [ec.headers(f"/v1/responses/{rid}", eos=True, extra=extra)])


def continued(picker, rid: str, user: str | None) -> list:
    body = {"model": "m", "input": "more", "previous_response_id": rid}
    return run(picker, [ec.headers("/v1/responses", extra=user_headers(user)), ec.body(body)])


def routed_to_its_pod(out) -> dict[str, str]:
    assert ec.immediate(out) is None, ec.immediate(out)
    sent = ec.set_headers(out[0])
    assert sent[DESTINATION_HEADER] == A1  # that pod alone, no fallback
    return sent


def refused(out, rid: str, param: str | None) -> str:
    """The refusal's message, with the id taken out (to compare refusals of different ids)."""
    status, body = ec.immediate(out)
    assert status == 404, body
    assert body["error"]["code"] == "response_not_found" and body["error"]["param"] == param
    return body["error"]["message"].replace(repr(rid), "<id>")


def forged_from(rid: str) -> str:
    head, mac, engine = rid[len(PREFIX) :].split(".")
    return f"{PREFIX}{head}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}.{engine}"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_the_owners_id_by_path_goes_to_its_pod_and_anothers_is_refused_as_forged(picker, method):
    alice = create(picker, "alice")
    sent = routed_to_its_pod(by_path(picker, method, alice, "alice"))
    assert sent[":path"] == f"/v1/responses/{ENGINE}"
    as_forged = refused(
        by_path(picker, method, forged_from(alice), "bob"), forged_from(alice), None
    )
    for other in ["bob", "alice ", "Alice", "alice\x00", None]:
        assert refused(by_path(picker, method, alice, other), alice, None) == as_forged


def test_the_owners_previous_response_id_continues_on_its_pod_and_anothers_is_refused(picker):
    alice = create(picker, "alice")
    out = continued(picker, alice, "alice")
    routed_to_its_pod(out)
    upstream = b"".join(body for body, _ in ec.streamed_bodies(out))
    assert json.loads(upstream)["previous_response_id"] == ENGINE
    param = "previous_response_id"
    as_forged = refused(continued(picker, forged_from(alice), "bob"), forged_from(alice), param)
    for other in ["bob", "alice\t", None]:
        assert refused(continued(picker, alice, other), alice, param) == as_forged


def test_a_read_back_answer_keeps_its_owners_id(picker):
    alice = create(picker, "alice")
    out = by_path(picker, "GET", alice, "alice")
    routed_to_its_pod(out)
    answer = json.dumps({"id": ENGINE, "object": "response"}).encode()
    out = run(
        picker,
        [
            ec.headers(
                f"/v1/responses/{alice}", eos=True, extra={":method": "GET", USER_HEADER: "alice"}
            ),
            ec.response_headers(200, served=A1),
            ec.response_body(answer, True),
        ],
    )
    assert answer_ids(out) == alice  # stamped for alice again, not for nobody


def test_without_a_user_ids_work_for_any_caller_without_one_as_before(picker):
    anyone = create(picker, None)
    routed_to_its_pod(by_path(picker, "GET", anyone, None))
    routed_to_its_pod(continued(picker, anyone, None))
    # An id made for nobody is not a user's: with auth on, nobody's ids are refused.
    refused(by_path(picker, "GET", anyone, "bob"), anyone, None)
    # An engine's own id from a caller without a user is routed as any request, as before.
    assert ec.immediate(by_path(picker, "GET", ENGINE, None)) is None


def test_a_user_cannot_reach_a_response_by_the_engine_id_inside_anothers_id(picker):
    create(picker, "alice")  # its id ends with the engine's
    refused(by_path(picker, "GET", ENGINE, "bob"), ENGINE, None)
    refused(by_path(picker, "DELETE", ENGINE, "bob"), ENGINE, None)
    refused(continued(picker, ENGINE, "bob"), ENGINE, "previous_response_id")


def test_without_stamped_answers_engine_ids_are_routed_for_users_too():
    """--response-headers-skipped: the picker never stamps an id, so engine ids are all
    clients have (and ownership is not enforced: the README says so)."""
    picker = ExternalProcessor(
        make_director(fallbacks=1, response_id_key=b"k" * 32, response_headers_skipped=True),
        BodyBudget(1 << 20),
    )
    assert ec.immediate(by_path(picker, "GET", ENGINE, "bob")) is None


@pytest.mark.parametrize("user", HOSTILE_USERS, ids=["huge", "nul", "crlf", "bidi", "escape"])
def test_hostile_user_names_own_their_ids_and_stay_out_of_answers_and_logs(picker, user, caplog):
    caplog.set_level(logging.DEBUG)
    theirs = create(picker, user)
    assert len(theirs) < 200  # the identity adds nothing to the id
    routed_to_its_pod(by_path(picker, "GET", theirs, user))
    routed_to_its_pod(continued(picker, theirs, user))
    alice = create(picker, "alice")
    for rid, caller in [(theirs, "alice"), (theirs, user[:-1]), (alice, user)]:
        status, body = ec.immediate(by_path(picker, "DELETE", rid, caller))
        assert status == 404 and len(body["error"]["message"]) < 1000
    assert all(user not in r.getMessage() for r in caplog.records)
