"""The KV-cache facade (kvindex.cache) and the index's key API (issue 20, part 2): the index
takes request keys, not vLLM events; the picker reaches the index only through KVCache; plugin
features are found by typed protocols, not attribute probes."""

from __future__ import annotations

import json
import re

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.request import parse_request
from infergw.kvindex.cache import KVCache, Prompt
from infergw.kvindex.events import BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.kvindex.translate import EventTranslator
from infergw.stack.local import DEFAULT_MODEL_DIR
from tests.paths import ROOT

A, B = "10.0.0.1:8000", "10.0.0.2:8000"
PROMPT = " ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(12))


def completion(model: str = "m", prompt: str = PROMPT) -> RequestContext:
    body = json.dumps({"model": model, "prompt": prompt}).encode()
    return RequestContext(parse_request("/v1/completions", body, {}, max_body_bytes=1 << 20))


# --- the index's key API


def test_the_index_takes_keys_and_has_no_event_entry():
    assert not hasattr(KVBlockIndex, "apply")
    index = KVBlockIndex(block_size=4)
    keys = prompt_keys(list(range(16)), 4, "m")
    index.add(A, keys, "gpu")
    index.add(B, keys[:2], "cpu", copies=2)
    assert index.match_lengths(keys) == {A: 4, B: 2}
    assert index.lookup(keys) == {A: 4.0, B: pytest.approx(1.6)}
    # One copy of B's first key goes: B still holds a second copy, so nothing is gone.
    assert index.remove(B, keys[:1], "cpu") == []
    assert index.remove(B, keys[:1], "cpu") == keys[:1]
    assert index.remove(B, keys[1:2], "gpu") == []  # held in another tier only
    assert index.holds_any(B, keys[1:2]) and not index.holds_any(B, keys[:1])
    # clear_pod drops the keys it is told of and finds the rest itself.
    index.clear_pod(A, keys[:1])
    index.clear_pod(B)
    assert index.stats()["entries"] == 0 and index.match_lengths(keys) == {}


def test_the_translator_is_what_the_subscriber_feeds():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks = tuple(range(8))
    sink.apply(A, "m", BlockStored((11, 12), None, toks, 4))
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {A: 2}
    assert sink.stats()["events"] == {"BlockStored": 1} and sink.stats()["engine_hashes"] == 2
    sink.clear_pod(A)
    assert index.stats()["entries"] == 0 and sink.stats()["engine_hashes"] == 0


# --- the facade


@pytest.fixture(scope="module")
def tokenizers():
    return PromptTokenizers({"m": DEFAULT_MODEL_DIR})


def test_the_cache_keys_a_prompt_as_the_events_do(tokenizers):
    index = KVBlockIndex(block_size=16)
    kv = KVCache(tokenizers=tokenizers, index=index)
    r = completion()
    prompt = kv.prompt(r)
    tokens = tokenizers.get("m").tokens_for("completions", {"model": "m", "prompt": PROMPT})
    assert prompt == Prompt(len(tokens), prompt_keys(tokens, 16, "m"))
    kept = r.tokens
    assert kv.prompt(r) == prompt and r.tokens is kept  # tokenized once a request
    full = len(tokens) // 16
    EventTranslator(index).apply(
        A, "m", BlockStored(tuple(range(1, full + 1)), None, tuple(tokens[: full * 16]), 16)
    )
    assert kv.score(prompt, [A, B], {"gpu": 1.0}) == [1.0, 0.0]
    assert kv.cached_prefix(prompt, A) == full * 16
    assert kv.matched_blocks(prompt, [A, B]) == {A: full, B: 0}
    kv.add_speculative(B, prompt)
    assert kv.score(prompt, [B], {"gpu": 1.0}) == [1.0]


async def test_the_cache_tokenizes_off_the_loop_before_it_is_asked(tokenizers):
    kv = KVCache(tokenizers=tokenizers, index=KVBlockIndex())
    r = completion()
    await kv.tokenize(r)
    assert r.tokens is not None and r.tokens.tokenizer is tokenizers.get("m")
    assert kv.prompt(r).tokens == len(r.tokens.ids) > 0


async def test_token_counting_and_prefix_scoring_tokenize_a_prompt_once(tokenizers, monkeypatch):
    """The gate counts a routed request's tokens and the precise scorer keys its prompt: both
    ask the KV facade, which tokenizes through the request's context, once."""
    from prometheus_client import CollectorRegistry

    from infergw.epp.gatekeeper import Gatekeeper
    from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer

    tokenizer = tokenizers.get("m")
    calls = []
    real = tokenizer.tokens_for

    def counting(api, body):
        calls.append(api)
        return real(api, body)

    monkeypatch.setattr(tokenizer, "tokens_for", counting)
    kv = KVCache(tokenizers=tokenizers, index=KVBlockIndex(block_size=16))
    gate = Gatekeeper(CollectorRegistry(), prompts=kv)
    scorer = PrecisePrefixCacheScorer("precise", kv=kv)
    ctx = completion()
    counted = await gate.count_input_tokens(ctx)
    await scorer.prepare(ctx)
    pods = [Endpoint(name="a", pod="a", address=A), Endpoint(name="b", pod="b", address=B)]
    assert scorer.score(ctx, pods) == [0.0, 0.0]
    assert scorer.cached_prompt(ctx, A) == (counted, 0)
    assert calls == ["completions"]  # one tokenization for the count and the keys
    assert counted == len(real("completions", {"model": "m", "prompt": PROMPT}))
    assert gate.input_tokens(ctx) == counted
    # Without a tokenizer for the model the gate estimates, and the scorer abstains.
    other = completion("unknown")
    assert await gate.count_input_tokens(other) == other.request.approx_prompt_tokens
    assert scorer.cached_prompt(other, A) is None and calls == ["completions"]


def test_a_lora_prompt_is_keyed_by_its_base_model_with_the_adapter(tokenizers):
    kv = KVCache(
        tokenizers=tokenizers,
        index=KVBlockIndex(block_size=16),
        base_model=lambda m: ("m", m) if m == "m-lora" else (m, None),
    )
    prompt = kv.prompt(completion("m-lora"))
    tokens = tokenizers.get("m").tokens_for("completions", {"model": "m", "prompt": PROMPT})
    assert prompt.keys == prompt_keys(tokens, 16, "m", lora_name="m-lora")


def test_no_tokenizer_no_prompt(tokenizers):
    kv = KVCache(tokenizers=tokenizers, index=KVBlockIndex())
    assert kv.prompt(completion("unknown")) is None


# --- plugin features by protocol


FEATURES = ("needs_kv_cache", "forget_server", "cached_prompt", "debug")


def test_no_plugin_feature_is_found_by_probing_attribute_names():
    names = "|".join(FEATURES)
    probe = re.compile(rf"getattr\([^)]*[\"']({names})[\"']")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "epp").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []
