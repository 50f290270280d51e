"""The picker's own tokenization gives vLLM's token ids (checked against the recording)."""

from __future__ import annotations

import json

import pytest

from kvindex.tokenize import PromptError, PromptTokenizer, PromptTokenizers
from tests.conftest import TINY, TINY_MODEL


def cases():
    return [json.loads(line) for line in (TINY / "requests.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer.from_dir(TINY_MODEL)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["path"].rsplit("/", 1)[1])
def test_tokens_equal_vllms(tok, case):
    api = "chat" if case["path"].endswith("/chat/completions") else "completions"
    assert tok.tokens_for(api, case["body"]) == case["tokenize"]["tokens"]


def test_cached_answers_are_identical(tok):
    body = {
        "messages": [
            {"role": "system", "content": "long system prompt " * 50},
            {"role": "user", "content": "hi"},
        ]
    }
    first = tok.tokens_for("chat", body)
    hits = tok.hits
    assert tok.tokens_for("chat", body) == first
    assert tok.hits == hits + 1


def test_content_parts_and_token_id_prompts(tok):
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    }
    plain = {"messages": [{"role": "user", "content": "a\nb"}]}
    assert tok.tokens_for("chat", parts) == tok.tokens_for("chat", plain)
    assert tok.tokens_for("completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]


@pytest.mark.parametrize(
    "api,body",
    [
        ("chat", {"messages": []}),
        ("chat", {"messages": [{"content": "no role"}]}),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("completions", {"prompt": 5}),
        ("completions", {"prompt": "\ud800"}),
        ("embeddings", {"input": "x"}),
    ],
)
def test_bad_bodies_are_prompt_errors(tok, api, body):
    with pytest.raises(PromptError):
        tok.tokens_for(api, body)


def test_registry_loads_on_demand():
    reg = PromptTokenizers({"tiny": TINY_MODEL})
    assert reg.get("unknown") is None
    assert reg.get("tiny") is reg.get("tiny")
