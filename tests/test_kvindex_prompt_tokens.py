"""The picker's own tokenization gives vLLM's token ids (checked against the recording)."""

from __future__ import annotations

import json
import os

import pytest

from kvindex.tokenize import PromptError, PromptTokenizer, PromptTokenizers
from tests.paths import TINY, TINY_MODEL


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


SYSTEM = (
    "You are a careful assistant for a large software company. Always answer in full "
    "sentences and cite the module. "
) * 12


def unverified(model_dir=TINY_MODEL) -> PromptTokenizer:
    """A tokenizer whose prefix reuse is never checked against a full encode: what it
    returns comes from the reuse path alone, so these tests see that path's mistakes."""
    tok = PromptTokenizer.from_dir(model_dir)
    tok._cache.VERIFY_FIRST = 0
    return tok


@pytest.mark.parametrize(
    "suffix",
    [
        "What does heapq do?",
        "Whatever",
        " leading space",
        "\n\n  indented",
        "x" * 300,
        "naïve café ✓ 日本語",
        "",
        "  ",
        "<s> special token text </s>",
    ],
)
def test_shared_prefix_reuse_gives_full_encode_ids(suffix):
    tok = unverified()
    plain = PromptTokenizer.from_dir(TINY_MODEL)
    tok.tokens_for("completions", {"prompt": SYSTEM + "first question?"})
    got = tok.tokens_for("completions", {"prompt": SYSTEM + suffix})
    assert got == plain._tok.encode(SYSTEM + suffix, add_special_tokens=True).ids
    chat = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": suffix or "?"},
        ]
    }
    assert tok.tokens_for("chat", chat) == plain.tokens_for("chat", chat)


def test_prefix_reuse_counts_hits_and_passes_its_own_checks():
    tok = PromptTokenizer.from_dir(TINY_MODEL)
    for i in range(20):
        tok.tokens_for("completions", {"prompt": SYSTEM + f"question {i}?"})
    assert tok.hits >= 19 and tok._cache.reuse_ok  # the first reuses were verified


def test_prefix_reuse_on_the_default_model_too():
    from stack.local import DEFAULT_MODEL_DIR

    tok, plain = unverified(DEFAULT_MODEL_DIR), PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    tok.tokens_for("completions", {"prompt": SYSTEM + "one"})
    for suffix in ("two", " three", "\nfour", "fi ve"):
        body = {"prompt": SYSTEM + suffix}
        assert (
            tok.tokens_for("completions", body)
            == plain._tok.encode(SYSTEM + suffix, add_special_tokens=True).ids
        )


@pytest.mark.parametrize("cut", range(0, 40, 3))
def test_prefix_reuse_is_exact_when_the_suffix_starts_mid_word(cut):
    tok = unverified()
    plain = PromptTokenizer.from_dir(TINY_MODEL)
    base = SYSTEM + "internationalization and localization of everything"
    tok.tokens_for("completions", {"prompt": base})
    text = base[: len(SYSTEM) + cut] + "zation?"
    assert (
        tok.tokens_for("completions", {"prompt": text})
        == plain._tok.encode(text, add_special_tokens=True).ids
    )


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.lists(
    st.sampled_from([*list("abc xyz\n\t.,'?é✓<>s/0123"), "  ", "<s>", "</s>"]), max_size=60
).map("".join)


@settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "150")), deadline=None)
@given(first=TEXT, second=TEXT, cut=st.integers(0, 60))
def test_prefix_reuse_matches_a_full_encode_for_any_texts(first, second, cut):
    tok = unverified()
    base = SYSTEM + first
    tok.tokens_for("completions", {"prompt": base})
    text = base[: len(SYSTEM) + min(cut, len(first))] + second
    assert (
        tok.tokens_for("completions", {"prompt": text})
        == tok._tok.encode(text, add_special_tokens=True).ids
    )
