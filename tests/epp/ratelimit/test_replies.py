"""RedisRateLimiter when whatever answers on Redis's address replies in a shape the bucket script
never returns (a proxy, another server, a bug): every such reply is a Redis error — the request
fails open (or closed, as configured), the failure is counted with reason `malformed_reply` and
logged — never an exception out of the limiter (which the picker would turn into a 500).

The server is a fake Redis speaking RESP3 (the client's default) on a real socket: HELLO gets
its map, EVALSHA and EVAL the reply under test, every other command +OK (the real script cannot
be made to answer out of shape). A real redis-server checks bucket keys overwritten with junk.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.ratelimit import RateLimitConfig, RateLimitMetrics, RedisRateLimiter
from tests.fuzzing import examples, fuzz_settings
from tests.redis_fakes import FakeRedis, resp
from tests.redis_server import redis_server_fixture  # noqa: F401

ERRORS = "infergate_epp_ratelimit_backend_errors_total"


@asynccontextmanager
async def limiter_on_fake(fail_open: bool = True):
    server = FakeRedis()
    await server.start()
    metrics = RateLimitMetrics()
    config = RateLimitConfig.from_spec(
        {"inputTokensPerUnit": 100, "outputTokensPerUnit": 100, "unit": "minute"}
    )
    # retry_interval 0: every call asks the server, so each reply under test is read.
    limiter = RedisRateLimiter.connect(
        config,
        server.address,
        fail_open=fail_open,
        retry_interval=0.0,
        timeout=5.0,
        metrics=metrics,
    )
    try:
        yield server, limiter, metrics
    finally:
        await limiter.aclose()
        await server.stop()


def malformed(metrics: RateLimitMetrics) -> float:
    return metrics.registry.get_sample_value(ERRORS, {"reason": "malformed_reply"}) or 0.0


def backend_errors(metrics: RateLimitMetrics) -> float:
    """All backend errors, whatever the reason."""
    samples = metrics.backend_errors.collect()[0].samples
    return sum(s.value for s in samples if s.name == ERRORS)


WRONG_CHECK_REPLIES = {
    "empty array": [],
    "nil": None,
    "status OK": ("+", "OK"),
    "integer": 1,
    "bulk string": b"1",
    "array of a string": [b"1"],
    "allowed with extras": [1, b"input"],
    "denied without wait": [0, b"input"],
    "unknown limit": [0, b"tokens", b"1.0"],
    "wait not a number": [0, b"input", b"soon"],
    "wait NaN": [0, b"output", b"nan"],
    "negative wait": [0, b"input", b"-3"],
    "wait as integer": [0, b"input", 5],
    "nested arrays": [[1]],
    "binary wait": [0, b"input", b"\xff\xfe"],
    "boolean true": [True],
    "double wait": [0, b"input", 1.5],
    "map": {b"allowed": 1},
    "big number": [0, ("(", "1"), b"1"],
    "RESP3 null": [0, b"input", ("_", "")],
    "status code 2": [2],
}


@pytest.mark.parametrize("reply", WRONG_CHECK_REPLIES.values(), ids=WRONG_CHECK_REPLIES.keys())
async def test_a_check_reply_out_of_shape_fails_open_counted_and_logged(reply, caplog):
    async with limiter_on_fake() as (server, limiter, metrics):
        server.replies = [resp(reply)]
        with caplog.at_level(logging.ERROR, logger="epp.ratelimit.redis_backend"):
            decision = await limiter.check("chat", None, 10)
        assert decision.allowed and decision.degraded
        assert malformed(metrics) == 1
        assert "rate limit backend failed (MalformedReply" in caplog.text


async def test_a_handshake_out_of_shape_fails_open_counted():
    async with limiter_on_fake() as (server, limiter, metrics):
        server.hello = resp(("+", "OK"))  # the client expects a map
        decision = await limiter.check("chat", None, 10)
        assert decision.allowed and decision.degraded
        errors = metrics.registry.get_sample_value(ERRORS, {"reason": "other"})
        assert errors == 1


async def test_a_check_reply_out_of_shape_denies_when_failing_closed():
    async with limiter_on_fake(fail_open=False) as (server, limiter, metrics):
        server.replies = [resp([0, b"input"])]
        decision = await limiter.check("chat", None, 10)
        assert (decision.allowed, decision.limit) == (False, "unavailable")
        assert malformed(metrics) == 1


async def test_charge_and_refund_replies_out_of_shape_are_counted_never_raised():
    async with limiter_on_fake() as (server, limiter, metrics):
        server.replies = [resp([1, 2, 3])]
        await limiter.record_output("chat", None, 7)
        await limiter.refund_input("chat", None, 5)
        assert malformed(metrics) == 2
        uncharged = "infergate_epp_ratelimit_uncharged_output_tokens_total"
        assert metrics.registry.get_sample_value(uncharged) == 7


async def test_the_limiter_recovers_when_replies_are_right_again():
    async with limiter_on_fake() as (server, limiter, _):
        server.replies = [resp([]), resp([1]), resp([0, b"input", b"2.5"])]
        assert (await limiter.check("chat", None, 10)).degraded
        assert limiter.available is False
        ok = await limiter.check("chat", None, 10)
        assert ok.allowed and not ok.degraded and limiter.available
        denied = await limiter.check("chat", None, 10)
        assert (denied.allowed, denied.limit, denied.retry_after) == (False, "input", 2.5)


# ---- property: any reply shape ------------------------------------------------------------

resp_values = st.recursive(
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.binary(max_size=24),
        st.sampled_from([b"input", b"output", b"inf", b"nan", b"-1", b"0.5", b"1e400"]),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.tuples(st.sampled_from(["+", "-"]), st.text("abcdefgh OKERR", max_size=12)),
        st.tuples(st.just("("), st.integers().map(str)),
        st.just(("_", "")),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.binary(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# Near-misses of the right shapes, so the property also covers the edges of each.
check_shaped = st.lists(
    st.one_of(st.sampled_from([0, 1, 2, -1]), resp_values), min_size=0, max_size=4
)


def as_read(value):
    """What the client makes of a one-line RESP3 value: a big number is an int, a simple
    string bytes, `_` None."""
    if isinstance(value, tuple) and value[0] == "(":
        return int(value[1])
    if isinstance(value, tuple) and value[0] == "+":
        return value[1].encode()
    if isinstance(value, tuple) and value[0] == "_":
        return None
    return value


def right_check_reply(value) -> bool:
    """What the script can answer to check: {1} or {0, "input"|"output", a wait >= 0}."""
    if not isinstance(value, list) or not value:
        return False
    value = [as_read(v) for v in value]
    if type(value[0]) is not int:  # booleans are not integers here
        return False
    if value == [1]:
        return True
    if len(value) != 3 or value[0] != 0:
        return False
    if value[1] not in (b"input", b"output") or not isinstance(value[2], bytes):
        return False
    try:
        wait = float(value[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return wait >= 0  # NaN compares False


@pytest.mark.fuzz
@fuzz_settings(60)
@given(replies=st.lists(st.one_of(resp_values, check_shaped), min_size=1, max_size=examples(8)))
def test_any_reply_to_check_is_a_decision_and_each_wrong_one_is_counted(replies):
    async def run() -> None:
        async with limiter_on_fake() as (server, limiter, metrics):
            server.replies = [resp(r) for r in replies]
            for i, reply in enumerate(replies):
                before = malformed(metrics)
                errors_before = backend_errors(metrics)
                decision = await limiter.check("chat", None, 10)
                if isinstance(reply, tuple) and reply[0] == "-":
                    assert decision.degraded  # an error reply: a Redis error as before
                    continue
                if right_check_reply(reply):
                    assert not decision.degraded, (i, reply)
                    assert malformed(metrics) == before
                else:
                    assert decision.allowed and decision.degraded, (i, reply)
                    assert malformed(metrics) == before + 1
                expected = 0 if right_check_reply(reply) else 1
                assert backend_errors(metrics) - errors_before == expected

    asyncio.run(run())


# ---- a real redis-server whose bucket keys were overwritten ------------------------------------


async def test_a_bucket_key_of_another_type_fails_open_counted(redis_server):
    """Someone (or a key collision) stored a plain string where a bucket hash lives: Redis
    refuses the script's HMGET (WRONGTYPE), which is a Redis error like any other."""
    metrics = RateLimitMetrics()
    config = RateLimitConfig.from_spec({"inputTokensPerUnit": 100, "unit": "minute"})
    limiter = RedisRateLimiter.connect(
        config, redis_server.address, retry_interval=0.0, timeout=5.0, metrics=metrics
    )
    try:
        input_key, _ = limiter.keys("chat", None)
        await limiter.client.set(input_key, "not a bucket")
        decision = await limiter.check("chat", None, 10)
        assert decision.allowed and decision.degraded
        assert metrics.registry.get_sample_value(ERRORS, {"reason": "response"}) == 1
        # garbage fields in a hash read as a full bucket: the limit holds again
        await limiter.client.delete(input_key)
        await limiter.client.hset(input_key, mapping={"t": "x", "s": "-inf", "u": "nan"})
        decision = await limiter.check("chat", None, 10)
        assert decision.allowed and not decision.degraded
        assert await limiter.level("chat", None, "input") == 90
    finally:
        await limiter.aclose()


HUGE_REPLIES = {
    # 300k elements: redis-py parsed them all, without yielding, past the call's timeout.
    "wide array": resp([0, b"input"] + [b"x"] * 300_000),
    # 60 MB of digits: was read whole, and parsed as an infinite wait (a denial).
    "huge bulk string": resp([0, b"input", b"9" * (60 * 1024 * 1024)]),
    "huge declared length": b"$1000000000000\r\n",
}


@pytest.mark.parametrize("reply", HUGE_REPLIES.values(), ids=HUGE_REPLIES.keys())
async def test_a_reply_longer_than_the_bound_is_refused_as_it_is_read(reply):
    async with limiter_on_fake() as (server, limiter, metrics):
        server.replies = [reply]
        decision = await limiter.check("chat", None, 10)
        assert decision.allowed and decision.degraded
        assert malformed(metrics) == 1
