"""One OpenAI-compatible API through the gateway, as clients use it: the official `openai`
client (sync and async, streaming, a tool call round trip, the Responses API, audio) and
LangChain's `ChatOpenAI`, against a local stack (what `infergate up` runs: real Envoy, two
picker replicas, simulator pods) with a ModelRoute in front of the engine's model. Also
Anthropic's Messages, rerank and score by plain HTTP, and hostile bodies on the new paths."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
import requests
import yaml

from tests.e2e.gateway_config import MODEL
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow
NET = "networking.infergate.io/v1alpha1"
ROUTE = "assistant"  # the public name, a ModelRoute to the pool
AUDIO = ("a.wav", b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav")
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("openai"), pods=2, pickers=2)
    server = {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": "sims", "namespace": "default"},
        "spec": {
            "model": MODEL,  # what the engine serves: the route's name is rewritten to it
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": f"{s.pool_name}-sim"}},
        },
    }
    route = {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": ROUTE, "namespace": "default"},
        "spec": {"modelName": ROUTE, "rules": [{"targetModels": [{"modelServerName": "sims"}]}]},
    }
    with s.pool_path.open("a") as f:  # the pickers reload their pool file on change
        f.write("---\n" + yaml.safe_dump_all([server, route]))
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    # Each picker reloads the pool file and scrapes the pods' models on its own: wait until
    # listings spread over both (Envoy balances streams between them) show both names.
    deadline, agreeing = time.monotonic() + 20, 0
    while agreeing < 10:
        agreeing = agreeing + 1 if {m.id for m in client.models.list()} == {ROUTE, MODEL} else 0
        assert time.monotonic() < deadline, "the pickers never listed the route and the model"
        time.sleep(0.05)
    yield s
    s.stop()


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)


def test_the_model_list_is_the_gateways_on_every_replica(client):
    lists = [client.models.list().model_dump() for _ in range(8)]  # spread over both pickers
    assert all(listed == lists[0] for listed in lists)
    cards = {m["id"]: m for m in lists[0]["data"]}
    assert [m["id"] for m in lists[0]["data"]] == [ROUTE, MODEL]  # the route first
    assert cards[ROUTE]["object"] == "model" and cards[ROUTE]["owned_by"] == "default"
    assert isinstance(cards[MODEL]["created"], int)
    assert client.models.retrieve(ROUTE).id == ROUTE
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nobody")
    assert info.value.body["code"] == "model_not_found"


def test_chat_sync_and_streaming_through_the_route(client):
    answer = client.chat.completions.create(
        model=ROUTE, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.model == ROUTE and answer.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model=ROUTE,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.model == ROUTE for c in chunks)
    assert chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_async_client(stack):
    async def run() -> tuple[str, int]:
        client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
        answers = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=ROUTE, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3
                )
                for i in range(4)
            ]
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        events = [chunk async for chunk in stream]
        await client.close()
        return answers[0].model, len(events)

    model, events = asyncio.run(run())
    assert model == ROUTE and events >= 3


def test_a_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=ROUTE, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=4
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather" and "city" in json.loads(call.function.arguments)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=ROUTE, messages=messages, tools=[WEATHER], max_tokens=4
    )
    assert second.choices[0].message.content and second.choices[0].finish_reason == "length"


def test_the_responses_api(client):
    answer = client.responses.create(model=ROUTE, input="hi", max_output_tokens=3)
    assert answer.model == ROUTE and answer.output_text
    assert answer.usage.output_tokens == 3


def test_audio_rerank_score_and_anthropic_messages(client, stack):
    text = client.audio.transcriptions.create(model=ROUTE, file=AUDIO)
    assert text.text
    r = requests.post(
        stack.url + "/v1/rerank",
        json={"model": ROUTE, "query": "red fox", "documents": ["blue sky", "a red fox"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == 1
    r = requests.post(
        stack.url + "/v1/score",
        json={"model": MODEL, "text_1": "red fox", "text_2": ["a red fox"]},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["data"][0]["object"] == "score"
    r = requests.post(
        stack.url + "/v1/messages",
        json={"model": ROUTE, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["model"] == ROUTE
    assert body["usage"]["output_tokens"] == 3 and body["stop_reason"] == "max_tokens"


def test_anthropic_messages_stream_with_the_public_name(stack):
    r = requests.post(
        stack.url + "/v1/messages",
        json={
            "model": ROUTE,
            "max_tokens": 3,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    events = [block.split("\n") for block in r.text.strip().split("\n\n")]
    kinds = [lines[0].removeprefix("event: ") for lines in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") == 3
    start = json.loads(events[0][1].removeprefix("data: "))
    assert start["message"]["model"] == ROUTE  # the engine said infergate-sim


@pytest.mark.parametrize(
    ("path", "data", "content_type", "status"),
    [
        ("/v1/audio/transcriptions", b"--x\r\nnot a form", "multipart/form-data; boundary=x", 400),
        ("/v1/audio/transcriptions", b'{"model": "assistant"}', "application/json", 400),
        ("/v1/audio/transcriptions", b"", "multipart/form-data", 400),  # no body, so no model
        ("/v1/messages", b'{"messages": [{"role": "user", "content": "hi"}]}', "application/json",
         400),
        ("/v1/rerank", b'{"model": "assistant", "query": "q"}', "application/json", 400),
        ("/v1/score", b'{"model": "nobody", "text_1": "a", "text_2": "b"}', "application/json",
         404),
        ("/v1/messages", b'{"model": "assistant", "messages": [', "application/json", 400),
    ],
)  # fmt: skip
def test_hostile_bodies_on_the_new_paths_are_clean_4xx(stack, path, data, content_type, status):
    r = requests.post(
        stack.url + path, data=data, headers={"content-type": content_type}, timeout=30
    )
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "code"}


def test_an_oversized_upload_is_413(stack):
    big = b"x" * (33 * 1024 * 1024)  # over the picker's 32 MiB --max-body-bytes
    r = requests.post(
        stack.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", big, "audio/wav")},
        data={"model": ROUTE},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_langchain_chat_openai(stack):
    langchain_openai = pytest.importorskip(
        "langchain_openai", reason="langchain-openai is not installed (not in the dev extra)"
    )
    chat = langchain_openai.ChatOpenAI(
        model=ROUTE, base_url=stack.url + "/v1", api_key="unused", max_tokens=4, max_retries=0
    )
    answer = chat.invoke("hi")
    assert answer.content and answer.response_metadata["model_name"] == ROUTE
    streamed = list(chat.stream("hi"))
    assert "".join(str(part.content) for part in streamed)
    called = chat.bind_tools([WEATHER], tool_choice="weather").invoke("weather in Paris?")
    assert called.tool_calls[0]["name"] == "weather"
