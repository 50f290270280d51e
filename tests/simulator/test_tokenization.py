"""Token ids must equal real vLLM's for the same model directory (tests/fixtures/vllm-cpu-tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infergw.simulator.tokenization import ChatTemplateError, ModelTokenizer
from tests.paths import DEFAULT_MODEL, TINY

FIXTURE = TINY
RECORDS = [json.loads(line) for line in (FIXTURE / "requests.jsonl").open() if line.strip()]


@pytest.fixture(scope="module")
def tiny() -> ModelTokenizer:
    return ModelTokenizer.from_dir(FIXTURE / "model")


@pytest.fixture(scope="module")
def default() -> ModelTokenizer:
    return ModelTokenizer.from_dir(None)


def prompt_ids(tok: ModelTokenizer, record: dict) -> list[int]:
    body = record["body"]
    if record["path"] == "/v1/completions":
        return tok.encode(body["prompt"], add_special_tokens=True)
    assert record["path"] == "/v1/chat/completions"
    text = tok.apply_chat_template(body["messages"], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("record", RECORDS, ids=[f"{i}:{r['path']}" for i, r in enumerate(RECORDS)])
def test_token_ids_match_vllm(tiny: ModelTokenizer, record: dict) -> None:
    ids = prompt_ids(tiny, record)
    assert ids == record["tokenize"]["tokens"]
    assert len(ids) == record["tokenize"]["count"] == record["usage"]["prompt_tokens"]
    if record["tokenize"].get("token_strs") is not None:  # only when the recorder asked for them
        assert tiny.token_strs(ids) == record["tokenize"]["token_strs"]


def test_fixture_covers_both_paths() -> None:
    assert {r["path"] for r in RECORDS} == {"/v1/completions", "/v1/chat/completions"}


def test_tiny_model_metadata(tiny: ModelTokenizer) -> None:
    assert tiny.vocab_size == 8192
    assert tiny.max_position_embeddings == 4096
    assert (tiny.bos_token_id, tiny.eos_token_id) == (1, 2)
    assert tiny.special_token_ids == {0, 1, 2}


def test_special_tokens_in_text_are_matched_whole(tiny: ModelTokenizer) -> None:
    ids = tiny.encode("a<s>b</s>", add_special_tokens=False)
    assert 1 in ids and 2 in ids


def test_content_parts_are_joined_with_newline(tiny: ModelTokenizer) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = tiny.apply_chat_template([{"role": "user", "content": parts}])
    as_string = tiny.apply_chat_template([{"role": "user", "content": "first\nsecond"}])
    assert as_parts == as_string == "<s>user: first\nsecond\n<s>assistant: "


def test_non_text_part_is_rejected(tiny: ModelTokenizer) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content\[0\].*'image_url'"):
        tiny.apply_chat_template([{"role": "user", "content": parts}])


def test_raise_exception_in_template(tiny: ModelTokenizer) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tiny.apply_chat_template([{"role": "system", "content": "x"}], chat_template=template)


def test_template_helpers(tiny: ModelTokenizer) -> None:
    template = "{{ tools | tojson }}|{{ flag }}|{{ strftime_now('%Y') | length }}"
    out = tiny.apply_chat_template(
        [], tools=[{"name": "é"}], chat_template=template, chat_template_kwargs={"flag": "on"}
    )
    assert out == '[{"name": "é"}]|on|4'


def test_bad_template_syntax(tiny: ModelTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tiny.apply_chat_template([], chat_template="{% for %}")


@pytest.mark.parametrize(
    "template,error",
    [
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ 'a' + 1 }}", "TypeError"),
        ("{{ ''.split('') }}", "ValueError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{% if x %}" * 3000 + "{% endif %}" * 3000, "nested too deeply"),
    ],
)
def test_errors_a_template_raises_are_chat_template_errors(
    tiny: ModelTokenizer, template: str, error: str
) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        tiny.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


def test_missing_template(tmp_path: Path) -> None:
    model = FIXTURE / "model"
    (tmp_path / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = ModelTokenizer.from_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.max_position_embeddings is None
    # An explicit template still works.
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}"
        )
        == "hi"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "messages must be a list"),
        ([["user", "hi"]], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role must be a string"),
        ([{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}], r"messages\[1\]\.role"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string or a list"),
    ],
)
def test_bad_messages(tiny: ModelTokenizer, messages: object, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tiny.apply_chat_template(messages)  # type: ignore[arg-type]


def test_continue_final_message(tiny: ModelTokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tiny.apply_chat_template(messages, continue_final_message=True)
    out = tiny.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert out == "<s>user: hi\n<s>assistant: Hello, I"


def test_decode_round_trip(tiny: ModelTokenizer, default: ModelTokenizer) -> None:
    text = "def f(x):\n    return {'ключ': x ** 2}  # ünïcode ✓\n"
    for tok in (tiny, default):
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False).endswith(text)


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_generation_token_ids(name: str, request: pytest.FixtureRequest) -> None:
    tok: ModelTokenizer = request.getfixturevalue(name)
    pool = tok.generation_token_ids()
    assert len(pool) > tok.vocab_size // 2
    assert not set(pool) & tok.special_token_ids
    for i in pool:
        text = tok.decode([i])
        assert text and text.isprintable() and "\ufffd" not in text


def test_default_model(default: ModelTokenizer) -> None:
    assert default.model_dir.name == "default_model"
    assert default.vocab_size == 8192
    assert default.max_position_embeddings == 4096
    assert (default.bos_token_id, default.eos_token_id) == (1, 2)
    assert default.special_token_ids == {0, 1, 2}
    # BOS comes from the post-processor for prompts...
    ids = default.encode("import os", add_special_tokens=True)
    assert ids[0] == 1 and default.encode("import os", add_special_tokens=False) == ids[1:]
    # ...and from the template for chats.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = default.apply_chat_template(messages)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = default.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 2
    assert default.decode(ids) == text.replace("<s>", "").replace("</s>", "")


def test_default_model_was_generated() -> None:
    model_dir = DEFAULT_MODEL
    config = json.loads((model_dir / "config.json").read_text())
    assert config["_generated_by"] == "simulator/tools/build_default_model.py"
    assert config["model_type"] == "llama"
    assert (model_dir / "tokenizer.json").stat().st_size < 700_000


def test_tool_call_arguments_are_parsed(tiny: ModelTokenizer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    template = (
        "{% generation %}{{ messages[0].tool_calls[0].function.arguments.x }}"
        "|{{ messages[0].content }}|{% endgeneration %}"
    )
    assert tiny.apply_chat_template(messages, chat_template=template) == "1||"
    assert call["function"]["arguments"] == '{"x": 1}'  # the caller's message is not mutated


def test_reserved_chat_template_kwargs(tiny: ModelTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="tokenize"):
        tiny.apply_chat_template([], chat_template_kwargs={"tokenize": True})


def test_add_bos_token_flag_rebuilds_post_processor(tmp_path: Path) -> None:
    model = FIXTURE / "model"
    (tmp_path / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ModelTokenizer.from_dir(tmp_path)
    plain = ModelTokenizer.from_dir(model).encode("hello", add_special_tokens=True)
    assert tok.encode("hello", add_special_tokens=True) == [1, *plain]
    assert tok.encode("hello", add_special_tokens=False) == plain
