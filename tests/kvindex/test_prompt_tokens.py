"""The picker's own tokenization gives vLLM's token ids (checked against the recording)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from infergw.kvindex.tokenize import PromptError, PromptTokenizer, PromptTokenizers
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
    from infergw.stack.local import DEFAULT_MODEL_DIR

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


# ---- a large prompt: other threads run while it is encoded, the cache keeps only ids -------


class _EncodeWatch:
    """The real tokenizer, and how often another thread ran while it was inside an encode:
    a thread that ticks every half millisecond, read just before and just after each call
    into the tokenizer (nothing between the read and the call lets the GIL go)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.ticks = 0
        self.inside = 0  # ticks that happened inside an encode call

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, *args, **kw):
        before = self.ticks
        out = self._tok.encode(*args, **kw)
        self.inside += self.ticks - before
        return out

    def encode_batch(self, *args, **kw):
        before = self.ticks
        out = self._tok.encode_batch(*args, **kw)
        self.inside += self.ticks - before
        return out

    def encode_batch_fast(self, *args, **kw):
        before = self.ticks
        out = self._tok.encode_batch_fast(*args, **kw)
        self.inside += self.ticks - before
        return out


def _ticks_inside_encodes(tok: PromptTokenizer, prompt: str) -> int:
    watch = _EncodeWatch(tok._tok)
    tok._tok = tok._cache._tok = watch
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.0005):
            watch.ticks += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        tok.tokens_for("completions", {"prompt": prompt})
    finally:
        done.set()
        ticker.join()
    return watch.inside


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["miss", "prefix-reuse"])
def test_other_threads_run_while_a_large_prompt_is_encoded(shared_prefix):
    """Tokenizers' encode() held the GIL for the whole encode: a 4 MiB prompt froze the
    picker's event loop (scrapes, every other request) for 16 s on a thread meant to keep it
    free. Held, the ticking thread gets no tick in while an encode runs."""
    from infergw.stack.local import DEFAULT_MODEL_DIR

    tok = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    prompt = " ".join(f"w{i}" for i in range(60_000))
    if shared_prefix:  # the first prompt is cached; the second reuses its ids
        tok.tokens_for("completions", {"prompt": prompt})
        prompt += " and a different ending"
    assert _ticks_inside_encodes(tok, prompt) > 20


def test_the_prefix_cache_keeps_ids_not_encodings():
    """An Encoding holds ~400 bytes a token: the cache (up to 2M tokens) kept one per
    prompt it had not reused yet, ~800 MB. It keeps the ids, and token starts once reused."""
    from tokenizers import Encoding

    tok = PromptTokenizer.from_dir(TINY_MODEL)
    tok.tokens_for("completions", {"prompt": SYSTEM + "first?"})
    held = [part for entry in tok._cache._entries.values() for part in entry]
    assert held and not any(isinstance(part, Encoding) for part in held)


def test_ids_without_offsets_are_the_encodings_ids():
    """The prompt path asks encode_batch_fast (no offsets) for ids: they must be what a full
    encode gives, with and without special tokens, for plain, unicode and added-token text."""
    from infergw.kvindex.tokenize import encode_unlocked, ids_unlocked
    from infergw.stack.local import DEFAULT_MODEL_DIR

    tok = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)._tok
    texts = ["hello " * 50, "naïve café — 東京 🙂 done", "", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        for special in (False, True):
            assert ids_unlocked(tok, text, special=special) == (
                encode_unlocked(tok, text, special=special).ids
            )
