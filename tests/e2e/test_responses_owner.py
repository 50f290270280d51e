"""Stored responses belong to whoever made them, through real Envoy checking the quickstart's
API keys (its client id reaches the picker as x-infergate-user) and a simulator pod that
stores responses as vLLM does: alice's response is hers to continue, read and delete; bob,
with his own valid key, gets 404 for it, as for an id that never existed."""

from __future__ import annotations

import openai
import pytest
import requests

from infergw.api.names import SERVED_HEADER
from infergw.epp.response_ids import PREFIX
from infergw.stack.example import Example
from infergw.stack.local import QUICKSTART
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow
MODEL = "infergate-sim"
ALICE_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml
BOB_KEY = "sk-infergate-dev-bob"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("resp-owner"), pods=1, auth=Example.read(QUICKSTART).auth
    )
    yield s
    s.stop()


def client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)


def delete(stack, rid: str, key: str) -> requests.Response:
    return requests.delete(
        f"{stack.url}/v1/responses/{rid}", headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_a_response_is_its_makers_alone(stack):
    alice, bob = client(stack, ALICE_KEY), client(stack, BOB_KEY)
    made = alice.responses.create(model=MODEL, input="Tell me a secret.", max_output_tokens=3)
    assert made.id.startswith(PREFIX)

    # bob, authenticated, holding alice's id: 404 everywhere, naming the field.
    with pytest.raises(openai.NotFoundError) as info:
        bob.responses.retrieve(made.id)
    assert info.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        bob.responses.create(
            model=MODEL, input="And then?", previous_response_id=made.id, max_output_tokens=3
        )
    assert info.value.body["param"] == "previous_response_id"
    # ... nor by the engine's id inside ours.
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(made.id.rsplit(".", 1)[1])
    refused = delete(stack, made.id, BOB_KEY)
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "response_not_found"

    # alice: all of it reaches the pod that stored it.
    assert alice.responses.retrieve(made.id).output_text == made.output_text
    more = alice.responses.create(
        model=MODEL, input="And then?", previous_response_id=made.id, max_output_tokens=3
    )
    assert more.previous_response_id == made.id
    # vLLM serves no DELETE: the pod's own 405 shows hers got there, where bob's did not.
    hers = delete(stack, made.id, ALICE_KEY)
    assert hers.status_code == 405 and SERVED_HEADER in hers.headers
    assert SERVED_HEADER not in refused.headers
