"""epp/request.py: parse_request validates an OpenAI-style request at the picker's edge and
produces an immutable request; epp/context.py keeps what the picker learns beside it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.errors import PickerError
from infergw.epp.request import api_for_path, parse_request

LIMIT = 1024 * 1024
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(body, path="/v1/chat/completions", headers=None, limit=LIMIT):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(path, raw, headers or {}, max_body_bytes=limit)


def status_of(body, path="/v1/chat/completions", headers=None, limit=LIMIT) -> int:
    with pytest.raises(PickerError) as info:
        parse(body, path, headers, limit)
    return info.value.status


# ---- the API comes from the path suffix ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/v1/chat/completions", "chat"),
        ("/v1/chat/completions/", "chat"),
        ("/v1/chat/completions?api-version=2024", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/responses", "responses"),
        ("/v1/conversations", "conversations"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/models", None),
        ("/v1/completions/extra", None),
        ("", None),
    ],
)
def test_api_for_path_uses_the_suffix(path, api):
    assert api_for_path(path) == api


def test_unknown_path_is_404():
    assert status_of(CHAT, path="/v1/models") == 404


def test_api_is_recorded_on_the_request():
    req = parse({"model": "m", "prompt": "x"}, path="/proxy/v1/completions")
    assert req.api == "completions"
    assert req.path == "/proxy/v1/completions"


# ---- body shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00garbage"])
def test_body_that_is_not_json_is_400(raw):
    assert status_of(raw) == 400


@pytest.mark.parametrize("body", [[], "model", 3, None])
def test_body_that_is_not_an_object_is_400(body):
    assert status_of(body) == 400


@pytest.mark.parametrize(
    "body",
    [
        {"messages": CHAT["messages"]},
        {"model": "", "messages": CHAT["messages"]},
        {"model": None, "messages": CHAT["messages"]},
        {"model": 7, "messages": CHAT["messages"]},
        {"model": ["m"], "messages": CHAT["messages"]},
    ],
)
def test_model_is_required_and_a_non_empty_string(body):
    with pytest.raises(PickerError) as info:
        parse(body)
    assert info.value.status == 400
    assert "model" in info.value.message


def test_error_body_follows_the_protocol_format():
    with pytest.raises(PickerError) as info:
        parse({"messages": CHAT["messages"]})
    err = info.value.body()["error"]
    assert err["code"] == 400
    assert err["type"] == "BadRequest"
    assert err["message"].startswith("inference error: BadRequest - ")


# ---- stream -------------------------------------------------------------------------------


def test_stream_defaults_to_false():
    assert parse(CHAT).stream is False


@pytest.mark.parametrize("value", [True, False])
def test_stream_boolean_is_kept(value):
    assert parse({**CHAT, "stream": value}).stream is value


@pytest.mark.parametrize("value", ["true", 1, 0, [], {}])
def test_stream_must_be_a_boolean(value):
    with pytest.raises(PickerError) as info:
        parse({**CHAT, "stream": value})
    assert info.value.status == 400
    assert "stream" in info.value.message


def test_stream_null_means_not_streaming():
    assert parse({**CHAT, "stream": None}).stream is False


# ---- prompt text per API ------------------------------------------------------------------


def test_chat_prompt_text_is_the_message_json_as_sent():
    # The client's bytes, not a re-serialization: no object tree of the body is built.
    raw = b'{"model":"m","messages": [{"role":"user","content":"h\\u00e9llo"}] }'
    assert parse(raw).prompt_text == '[{"role":"user","content":"h\\u00e9llo"}]'


def test_chat_prompt_text_of_a_growing_conversation_keeps_its_prefix():
    turn1 = [{"role": "user", "content": "a long first question"}]
    turn2 = [*turn1, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "q"}]
    first = parse({"model": "m", "messages": turn1}).prompt_text
    second = parse({"model": "m", "messages": turn2}).prompt_text
    assert second.startswith(first[:-1])  # all but the closing bracket


@pytest.mark.parametrize("messages", [None, [], "hi", {"role": "user"}])
def test_chat_needs_a_non_empty_message_list(messages):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    with pytest.raises(PickerError) as info:
        parse(body)
    assert info.value.status == 400
    assert "messages" in info.value.message


def test_completions_prompt_string_is_used_verbatim():
    req = parse({"model": "m", "prompt": "Once upon a time"}, path="/v1/completions")
    assert req.prompt_text == "Once upon a time"


def test_completions_prompt_list_is_its_json_as_sent():
    req = parse(b'{"model":"m","prompt":["a", "b"]}', path="/v1/completions")
    assert req.prompt_text == '["a", "b"]'
    tokens = parse(b'{"model":"m","prompt":[1,2,3]}', path="/v1/completions")
    assert tokens.prompt_text == "[1,2,3]"


def test_completions_needs_a_prompt():
    assert status_of({"model": "m"}, path="/v1/completions") == 400


def test_responses_prompt_is_instructions_tools_and_input():
    body = {
        "model": "m",
        "instructions": "be brief",
        "tools": [{"type": "function", "name": "f"}],
        "input": "what?",
    }
    req = parse(json.dumps(body, separators=(",", ":")).encode(), path="/v1/responses")
    assert req.prompt_text == '"be brief"\n[{"type":"function","name":"f"}]\n"what?"'
    only_input = parse({"model": "m", "input": "what?"}, path="/v1/responses")
    assert only_input.prompt_text == '"what?"'


def test_embeddings_input_string_or_list():
    assert parse({"model": "m", "input": "x y"}, path="/v1/embeddings").prompt_text == "x y"
    listed = parse(b'{"model":"m","input":["x","y"]}', path="/v1/embeddings")
    assert listed.prompt_text == '["x","y"]'
    assert status_of({"model": "m"}, path="/v1/embeddings") == 400


def test_conversations_have_no_prompt_text():
    assert parse({"model": "m"}, path="/v1/conversations").prompt_text == ""


def test_approx_prompt_tokens_is_a_quarter_of_the_characters_at_least_one():
    assert (
        parse({"model": "m", "prompt": "x" * 400}, path="/v1/completions").approx_prompt_tokens
        == 100
    )
    assert parse({"model": "m", "prompt": ""}, path="/v1/completions").approx_prompt_tokens == 1


# ---- max tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"max_tokens": 10}, 10),
        ({"max_completion_tokens": 20}, 20),
        ({"max_output_tokens": 30}, 30),
        ({"max_completion_tokens": 20, "max_tokens": 10, "max_output_tokens": 30}, 20),
        ({"max_tokens": 10, "max_output_tokens": 30}, 10),
        ({"max_completion_tokens": None, "max_tokens": 10}, 10),
    ],
)
def test_max_tokens_keys_in_order_of_preference(extra, expected):
    assert parse({**CHAT, **extra}).max_tokens == expected


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
@pytest.mark.parametrize("value", [True, "10", 10.5, 0, -1, -(10**18), 10**18, 2**24 + 1])
def test_max_tokens_of_a_wrong_type_or_out_of_range_is_400_naming_it(key, value):
    # A negative or absurd limit would be added to a pod's in-flight tokens (and charged).
    with pytest.raises(PickerError) as info:
        parse({**CHAT, key: value})
    assert info.value.status == 400 and info.value.param == key
    assert info.value.body()["error"]["param"] == key


def test_a_400_digit_max_tokens_is_400():
    raw = b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":' + b"9" * 400
    assert status_of(raw + b"}") == 400


def test_max_tokens_up_to_the_ceiling_is_kept():
    from infergw.epp.request_body import MAX_TOKENS_CEILING

    assert parse({**CHAT, "max_tokens": MAX_TOKENS_CEILING}).max_tokens == MAX_TOKENS_CEILING


# ---- headers ------------------------------------------------------------------------------


def test_defaults_without_control_headers():
    req = parse(CHAT)
    assert req.session_id is None and req.user is None
    assert req.model == "m"
    uuid.UUID(req.request_id)  # a generated UUID
    ctx = RequestContext(req)  # before the trust and the director have their say
    assert ctx.fairness_id == "default-flow"
    assert ctx.objective is None
    assert ctx.target_model == "m"
    assert ctx.priority == 0
    assert ctx.targets == [] and ctx.resolution is None and ctx.ticket is None


def test_the_parsed_request_cannot_be_changed():
    req = parse(CHAT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.model = "other"  # type: ignore[misc]
    assert not hasattr(req, "state")  # no scratchpad to write into


def test_each_request_gets_its_own_generated_id():
    assert parse(CHAT).request_id != parse(CHAT).request_id


def test_control_headers_are_read():
    headers = {
        "x-request-id": "req-1",
        "x-gateway-inference-fairness-id": "tenant-a",
        "x-gateway-inference-objective": "premium",
        "x-session-id": "sess-9",
        "x-infergate-user": "ann",
        "x-gateway-model-name-rewrite": "m-lora",
    }
    req = parse(CHAT, headers=headers)
    assert req.request_id == "req-1"
    assert req.session_id == "sess-9"
    assert req.user == "ann"
    assert req.model == "m"
    assert req.headers is headers
    # Claims a client may make are the trust's to believe (tests/test_epp_trust.py), not
    # parsing's: the context starts without them.
    ctx = RequestContext(req)
    assert (ctx.fairness_id, ctx.objective, ctx.target_model) == ("default-flow", None, "m")


def test_empty_header_values_fall_back_to_defaults():
    headers = {
        "x-request-id": "",
        "x-gateway-inference-fairness-id": "",
        "x-gateway-model-name-rewrite": "",
    }
    req = parse(CHAT, headers=headers)
    assert req.request_id


# ---- body size ----------------------------------------------------------------------------


def test_body_over_the_limit_is_413_before_anything_else():
    raw = b"x" * 101  # not even JSON, and the path is wrong: the size is checked first
    with pytest.raises(PickerError) as info:
        parse_request("/nope", raw, {}, max_body_bytes=100)
    assert info.value.status == 413
    assert "101" in info.value.message and "100" in info.value.message


def test_body_exactly_at_the_limit_is_accepted():
    raw = json.dumps(CHAT).encode()
    req = parse_request("/v1/chat/completions", raw, {}, max_body_bytes=len(raw))
    assert req.model == "m"


# ---- what goes upstream -------------------------------------------------------------------


def test_body_for_upstream_is_the_raw_bytes_without_a_rewrite():
    raw = b'{ "model" : "m",  "prompt": "x" }'
    req = parse_request("/v1/completions", raw, {}, max_body_bytes=LIMIT)
    assert req.body_for_upstream("m") is raw
    assert RequestContext(req).upstream_body() is raw


def test_body_for_upstream_changes_only_the_model_member():
    raw = '{"prompt": "héllo ☃ \\"model\\":\\"m\\"", "tools":[{"model":"m"}], "model" : "m"}'
    req = parse(raw.encode(), path="/v1/completions")
    out = RequestContext(req, target_model="m-v2").upstream_body()
    assert out == raw.replace('"model" : "m"', '"model" : "m-v2"').encode()
    assert req.raw_body == raw.encode()  # the client's body is not changed


@pytest.mark.parametrize("value", ["yes", 5, [1]])
def test_stream_options_must_be_an_object(value):
    with pytest.raises(PickerError) as info:
        parse({**CHAT, "stream": True, "stream_options": value})
    assert info.value.status == 400 and "stream_options" in info.value.message


def counting_tokenizer():
    """The simulator's tokenizer, and the list of APIs it was asked to tokenize for."""
    from infergw.kvindex.tokenize import PromptTokenizer
    from infergw.stack.local import DEFAULT_MODEL_DIR

    calls = []

    class Counting(PromptTokenizer):
        def tokens_for(self, api, body):
            calls.append(api)
            return super().tokens_for(api, body)

    return Counting.from_dir(DEFAULT_MODEL_DIR), calls


def test_the_prompt_is_tokenized_once_per_request_and_tokenizer():
    from infergw.kvindex.tokenize import PromptTokenizer
    from infergw.stack.local import DEFAULT_MODEL_DIR

    tokenizer, calls = counting_tokenizer()
    ctx = RequestContext(parse(CHAT))
    first = ctx.prompt_token_ids(tokenizer)
    assert ctx.prompt_token_ids(tokenizer) is first and calls == ["chat"]
    assert ctx.tokens is not None and ctx.tokens.ids is first  # kept in the context
    assert list(first) == PromptTokenizer.from_dir(DEFAULT_MODEL_DIR).tokens_for("chat", CHAT)
    assert first.itemsize == 4  # 4 bytes a token for as long as the request lives


def test_token_ids_out_of_32_bits_are_a_prompt_error_not_a_crash():
    from infergw.kvindex.tokenize import PromptError, PromptTokenizer
    from infergw.stack.local import DEFAULT_MODEL_DIR

    ctx = RequestContext(parse({"model": "m", "prompt": [1, 2**40]}, path="/v1/completions"))
    with pytest.raises(PromptError):
        ctx.prompt_token_ids(PromptTokenizer.from_dir(DEFAULT_MODEL_DIR))


def test_a_prompt_over_the_tokenizing_limit_is_not_tokenized():
    from infergw.epp.request import MAX_TOKENIZED_BYTES
    from infergw.kvindex.tokenize import PromptError

    tokenizer, calls = counting_tokenizer()
    messages = [{"role": "user", "content": "x" * MAX_TOKENIZED_BYTES}]
    ctx = RequestContext(parse({"model": "m", "messages": messages}, limit=2 * MAX_TOKENIZED_BYTES))
    with pytest.raises(PromptError):
        ctx.prompt_token_ids(tokenizer)
    assert calls == []  # the estimate stands in: nothing was decoded or tokenized


async def test_a_small_prompt_is_tokenized_while_a_large_one_still_is():
    """Every request waits for its prompt's tokens (precise prefix scorer, token limits): on
    one tokenizing thread, four 4 MiB prompts held a 1-token request for 9 s. The real
    tokenizer, held inside the large prompt until the small one's tokens are in."""
    import threading

    from infergw.epp.request import LARGE_PROMPT_BYTES
    from infergw.kvindex.tokenize import PromptTokenizer
    from infergw.stack.local import DEFAULT_MODEL_DIR

    release = threading.Event()

    class HeldOnLargePrompts(PromptTokenizer):
        def tokens_for(self, api, body):
            if len(body["prompt"]) > LARGE_PROMPT_BYTES:
                release.wait(timeout=30)
            return super().tokens_for(api, body)

    tokenizer = HeldOnLargePrompts.from_dir(DEFAULT_MODEL_DIR)
    large = RequestContext(
        parse({"model": "m", "prompt": "w " * LARGE_PROMPT_BYTES}, path="/v1/completions")
    )
    small = RequestContext(parse({"model": "m", "prompt": "hello"}, path="/v1/completions"))
    large_done = asyncio.create_task(large.tokenize(tokenizer))
    await asyncio.sleep(0)  # the large prompt is on its thread first
    try:
        await asyncio.wait_for(small.tokenize(tokenizer), timeout=20)
        assert not large_done.done()  # the small one did not wait for it
    finally:
        release.set()
    await large_done
    assert len(small.prompt_token_ids(tokenizer)) > 0
    assert len(large.prompt_token_ids(tokenizer)) > LARGE_PROMPT_BYTES // 2
