"""Fuzz the request path through the real ext_proc stream handler: ≥ 10,000 hostile bodies
and header sets, each sent as Envoy sends it (headers, the body in chunks, and for a routed
request the response phase), and every answer must be a routed request or a 4xx with the
OpenAI-style error — never a 500 — with nothing left counted in flight or held in the budget.

Hypothesis draws a path, hostile values for a few fields of a well-formed body, and headers;
each example then sends BODIES_PER_EXAMPLE variants of that body (fields set to hostile values,
truncations, flipped bytes, spliced hostile fragments), which reaches the count cheaply in the
normal run.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.api.names import DESTINATION_HEADER
from infergw.epp.body_budget import BodyBudget
from infergw.epp.extproc import ExternalProcessor
from tests import extproc_client as ec
from tests.director_fixtures import make_director
from tests.fuzzing import fuzz_settings

EXAMPLES = 100
BODIES_PER_EXAMPLE = 100  # 100 × 100 = 10,000 bodies in the normal run
sent = {"bodies": 0, "routed": 0}

ROUTABLE = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/conversations",
    "/openai/v1/chat/completions?x=1",
    "/\u00e9/completions",  # the suffix names the API
]
PATHS = [
    *ROUTABLE,
    "/v1/models",
    "/v1/chat/completions/../../admin",
    "",
]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "instructions",
    "tools",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "cache_salt",
    "add_generation_prompt",
    "chat_template_kwargs",
    "user",
    "extra",
]
HEADERS = [
    "x-gateway-model-name-rewrite",
    "x-gateway-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-infergate-user",
    "x-session-id",
    "x-request-id",
    "x-prefiller-host-port",
    "content-length",
    "content-type",
]
# Fragments that have broken parsers: spliced into bodies at random.
FRAGMENTS = [
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b"\xff\xfe",
    b"\xed\xa0\x80",
    b"9" * 5000,
    b"-" + b"9" * 400,
    b"[" * 5000,
    b"{" * 3000,
    b"1e999999",
    b"NaN",
    b"Infinity",
    b"\x00",
    b'"model":',
    b',"max_tokens":-1',
    b',"stream":true,"stream_options":null',
    b"[{},{},{},{}]",
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None), max_size=12),  # lone surrogates included
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
overrides = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3)
header_sets = st.dictionaries(
    st.sampled_from(HEADERS), st.text(st.characters(codec="utf-8"), max_size=20), max_size=3
)
# Values set into a well-formed body by the cheap per-example mutations.
HOSTILE_VALUES = [
    None,
    -1,
    0,
    10**18,
    -(10**400),
    1e308,
    float("nan"),
    "\ud800",
    "",
    [],
    {},
    [[[[[]]]]],
    [{}] * 50,
    {"include_usage": "yes"},
    {"include_usage": True, "continuous_usage_stats": True},
    True,
    "m",
    [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
    [{"role": "user", "content": "hi"}],
    [1, 2, 3],
]


def valid_body(path: str) -> dict:
    """A body the picker routes, for the API the path names."""
    body: dict = {"model": "m", "max_tokens": 8}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hello"}]
    elif "completions" in path:
        body["prompt"] = "hello"
    elif "responses" in path or "embeddings" in path:
        body["input"] = "hello"
    return body


def serialize(body: dict) -> bytes:
    # ensure_ascii writes lone surrogates as the \\ud800 escapes clients can send; NaN and
    # Infinity come out as the non-JSON words Python writes.
    return json.dumps(body).encode()


def variants(body: dict, clean: dict, rng: random.Random, count: int):
    """`body` itself, then half semantic mutations (a field of `body` or of the `clean` body
    set to a hostile value, still JSON) and half byte mutations of `body` (truncated, flipped,
    spliced with hostile fragments)."""
    raw = serialize(body)
    yield raw
    for i in range(count - 1):
        if i % 2 == 0:
            changed = dict(body if i % 4 == 0 else clean)
            for _ in range(rng.randint(1, 2)):
                changed[rng.choice(FIELDS)] = rng.choice(HOSTILE_VALUES)
            yield serialize(changed)
            continue
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(4)
            at = rng.randint(0, len(data))
            if kind == 0:
                data[at:] = b""  # truncated
            elif kind == 1 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif kind == 2:
                data[at:at] = rng.choice(FRAGMENTS)
            else:
                data[at : at + rng.randint(0, 8)] = b""
        yield bytes(data)


ANSWER = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'


def messages_for(path: str, headers: dict[str, str], raw: bytes, rng: random.Random) -> list:
    out = [ec.headers(path, extra=headers)]
    cuts = sorted(rng.sample(range(1, len(raw)), min(3, len(raw) - 1))) if len(raw) > 1 else []
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    out += [ec.body(p, eos=i == len(parts) - 1) for i, p in enumerate(parts)]
    # For a routed request, the answer (whose usage the picker reads on the side): a stream
    # or a JSON body, well-formed or as mangled as the request.
    content_type = rng.choice(["text/event-stream", "application/json"])
    answer = rng.choice([ANSWER, b"data: " + raw + b"\n\n", raw])
    out += [ec.response_headers(200, content_type), ec.response_body(answer, eos=True)]
    return out


def check(out: list) -> None:
    first = out[0].WhichOneof("response") if out else None
    if first == "immediate_response":
        status, body = ec.immediate(out)
        assert 400 <= status < 500, (status, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
        return
    assert first == "request_headers", out
    assert DESTINATION_HEADER in ec.set_headers(out[0])


@pytest.fixture(scope="module")
def picker():
    director = make_director(fallbacks=1)
    budget = BodyBudget(8 * 1024 * 1024)
    return director, budget, ExternalProcessor(director, budget)


@pytest.mark.fuzz
@fuzz_settings(EXAMPLES)
@given(
    path=st.sampled_from(PATHS),
    changes=overrides,
    headers=header_sets,
    seed=st.integers(0, 2**32),
)
def test_every_hostile_body_is_routed_or_a_4xx_never_a_500(picker, path, changes, headers, seed):
    director, budget, servicer = picker
    rng = random.Random(seed)
    clean = valid_body(path)
    body = {**clean, **changes}

    async def run() -> None:
        out = await ec.process(servicer, messages_for(path, {}, serialize(clean), rng))
        assert (ec.immediate(out) is None) == (path in ROUTABLE)  # the routed path is live
        for raw in variants(body, clean, rng, BODIES_PER_EXAMPLE):
            out = await ec.process(servicer, messages_for(path, headers, raw, rng))
            check(out)
            sent["bodies"] += 1
            sent["routed"] += ec.immediate(out) is None

    asyncio.run(run())
    assert budget.held == 0  # every stream gave back what it took
    for endpoint in director.datastore.endpoints():
        assert endpoint.inflight_requests == 0 and endpoint.inflight_tokens == 0


@pytest.mark.fuzz
def test_the_suite_sent_at_least_10k_bodies(picker):
    # Runs after the property above (file order): the count the issue asks for was reached.
    if not sent["bodies"]:
        pytest.skip("the property test above did not run in this session")
    assert sent["bodies"] >= EXAMPLES * BODIES_PER_EXAMPLE >= 10_000
    assert sent["routed"] >= 100  # the routed path was exercised too (about 1 in 7)
