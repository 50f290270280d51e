"""The simulator keeps Responses API answers as vLLM does: `previous_response_id` continues a
stored one (its conversation in the prompt), an id it does not hold is 404, `GET
/v1/responses/{id}` reads one back, `store: false` keeps nothing; the store is bounded."""

from __future__ import annotations

import openai
import pytest
import requests

from infergw.simulator.protocol import ApiError
from infergw.simulator.response_store import ResponseStore
from tests.conftest import free_port, running, simulator_cmd


@pytest.fixture(scope="module")
def url():
    port = free_port()
    cmd = simulator_cmd(port, "--sim-time-scale", "0")
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def model_of(client) -> str:
    return client.models.list().data[0].id


def test_a_stored_response_continues_with_its_conversation(client):
    model = model_of(client)
    first = client.responses.create(model=model, input="one two three", max_output_tokens=4)
    second = client.responses.create(
        model=model, input="four", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.previous_response_id == first.id
    # The prompt holds the first exchange: its input, its answer, then the new input.
    alone = client.responses.create(model=model, input="four", max_output_tokens=4)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text


def test_a_streamed_response_is_stored_and_continued(client):
    model = model_of(client)
    stream = client.responses.create(model=model, input="one two", max_output_tokens=4, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert done.id == events[0].response.id and done.output_text == deltas
    again = client.responses.create(model=model, input="three", previous_response_id=done.id)
    assert again.previous_response_id == done.id


def test_an_unknown_or_unstored_id_is_404_as_in_vllm(client, url):
    model = model_of(client)
    unstored = client.responses.create(model=model, input="hi", store=False, max_output_tokens=2)
    for missing in ("resp_nope", unstored.id):
        with pytest.raises(openai.NotFoundError, match=f"Response with id '{missing}' not found"):
            client.responses.create(model=model, input="hi", previous_response_id=missing)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)


def test_cancel_is_refused_for_a_finished_response_and_delete_is_not_served(client, url):
    made = client.responses.create(model=model_of(client), input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(made.id)
    assert requests.delete(f"{url}/v1/responses/{made.id}", timeout=10).status_code == 405


def test_a_previous_response_id_that_is_not_a_string_is_400(url, client):
    r = requests.post(
        f"{url}/v1/responses",
        json={"model": model_of(client), "input": "hi", "previous_response_id": 5},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


def test_the_store_forgets_the_oldest_past_its_capacity():
    store = ResponseStore(capacity=3)
    for i in range(5):
        store.put({"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}])
    assert len(store) == 3
    with pytest.raises(ApiError) as info:
        store.get("resp_0")
    assert info.value.status == 404
    assert store.get("resp_4").messages == ({"role": "user", "content": "4"},)
