"""RateLimiter (in-process): parsing a route's rateLimit, keys per route and per user, input
taken before dispatch, output charged after, which limit a denial names, Retry-After."""

from __future__ import annotations

import msgspec
import pytest

from infergw.api.networking import RateLimit
from infergw.epp.ratelimit import (
    Decision,
    RateLimitConfig,
    RateLimiter,
    RateLimitMetrics,
    RedisClients,
    RedisRateLimiter,
    build_limiter,
)


def limiter(**spec) -> RateLimiter:
    return RateLimiter.from_spec(spec)


# ---- the spec ----------------------------------------------------------------------------------


def test_config_from_the_manifest_dict():
    c = RateLimitConfig.from_spec(
        {
            "inputTokensPerUnit": 1000,
            "outputTokensPerUnit": 200,
            "unit": "minute",
            "perUser": True,
            "global": {"redis": {"address": "redis.default.svc:6379"}},
        }
    )
    assert c == RateLimitConfig(1000, 200, "minute", True, "redis.default.svc:6379")
    assert c.unit_seconds == 60


def test_config_defaults_follow_the_crd():
    c = RateLimitConfig.from_spec({"outputTokensPerUnit": 5})
    assert (c.input_tokens_per_unit, c.unit, c.per_user, c.redis_address) == (
        None,
        "second",
        False,
        None,
    )
    assert c.unit_seconds == 1


def test_config_from_the_typed_api_object():
    typed = msgspec.convert(
        {"inputTokensPerUnit": 7, "unit": "hour", "global": {"redis": {"address": "r:1"}}},
        RateLimit,
    )
    c = RateLimitConfig.from_spec(typed)
    assert (c.input_tokens_per_unit, c.unit, c.redis_address) == (7, "hour", "r:1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"unit": "minute"}, "set inputTokensPerUnit or outputTokensPerUnit"),
        ({"inputTokensPerUnit": 0}, "inputTokensPerUnit: must be an integer of at least 1"),
        ({"outputTokensPerUnit": 1.5}, "outputTokensPerUnit: must be an integer of at least 1"),
        ({"inputTokensPerUnit": True}, "inputTokensPerUnit: must be an integer"),
        ({"inputTokensPerUnit": 1, "unit": "week"}, "rateLimit.unit: must be one of"),
        ({"inputTokensPerUnit": 1, "perUser": "yes"}, "perUser: must be a boolean"),
        ({"inputTokensPerUnit": 1, "global": {}}, "global.redis.address: required"),
        (
            {"inputTokensPerUnit": 1, "global": {"redis": {"address": "redis"}}},
            "global.redis.address: must be host:port",
        ),
        ({"inputTokensPerUnit": 1, "burst": 3}, "unknown field 'burst'"),
        ([1, 2], "rateLimit: must be an object"),
    ],
)
def test_config_errors_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        RateLimitConfig.from_spec(spec)


# ---- decisions ---------------------------------------------------------------------------------


async def test_input_limit_admits_one_burst_then_denies_with_retry_after():
    rl = limiter(inputTokensPerUnit=100, unit="minute")
    for _ in range(100):
        assert (await rl.check("chat", None, 1, now=0.0)).allowed
    d = await rl.check("chat", None, 1, now=0.0)
    assert (d.allowed, d.limit, d.tokens_per_unit, d.unit) == (False, "input", 100, "minute")
    assert d.retry_after == pytest.approx(0.6)  # one token per 0.6 s
    assert d.retry_after_header() == "1"
    assert d.message() == "token rate limit exceeded: 100 input tokens per minute"
    assert (await rl.check("chat", None, 1, now=0.6)).allowed


async def test_input_is_taken_with_the_real_count():
    rl = limiter(inputTokensPerUnit=1000, unit="minute")
    assert (await rl.check("r", None, 700, now=0.0)).allowed
    d = await rl.check("r", None, 400, now=0.0)  # 300 left, 100 missing at 1000/60 per second
    assert d.limit == "input" and d.retry_after == pytest.approx(6.0)
    assert d.retry_after_header() == "6"
    assert (await rl.check("r", None, 300, now=0.0)).allowed  # the denial took nothing


async def test_a_prompt_larger_than_the_budget_is_denied_without_retry_after():
    rl = limiter(inputTokensPerUnit=100)
    d = await rl.check("r", None, 101, now=0.0)
    assert not d.allowed and d.retry_after is None and d.retry_after_header() is None
    assert d.message() == (
        "request has 101 input tokens, more than the limit of 100 input tokens per second"
    )
    assert (await rl.check("r", None, 100, now=0.0)).allowed


async def test_routes_have_separate_budgets():
    rl = limiter(inputTokensPerUnit=10, unit="hour")
    assert (await rl.check("a", "u", 10, now=0.0)).allowed
    assert not (await rl.check("a", "v", 1, now=0.0)).allowed  # not per user: shared
    assert (await rl.check("b", "u", 10, now=0.0)).allowed


async def test_per_user_budgets_are_separate():
    rl = limiter(inputTokensPerUnit=10, unit="hour", perUser=True)
    assert (await rl.check("a", "alice", 10, now=0.0)).allowed
    assert not (await rl.check("a", "alice", 1, now=0.0)).allowed
    assert (await rl.check("a", "bob", 10, now=0.0)).allowed
    assert (await rl.check("b", "alice", 10, now=0.0)).allowed  # and still per route
    # Requests without a verified user share one anonymous budget.
    assert (await rl.check("a", None, 6, now=0.0)).allowed
    assert not (await rl.check("a", "", 6, now=0.0)).allowed


async def test_output_charge_drives_later_denial():
    rl = limiter(outputTokensPerUnit=100, unit="minute")
    assert (await rl.check("r", None, 5000, now=0.0)).allowed  # no input limit
    await rl.record_output("r", None, 150, now=1.0)  # -50 (+ refill since 0: full anyway)
    d = await rl.check("r", None, 1, now=1.0)
    assert (d.allowed, d.limit, d.tokens_per_unit, d.unit) == (False, "output", 100, "minute")
    # From -50 to 1 token: 51 tokens at 100/60 per second.
    assert d.retry_after == pytest.approx(30.6)
    assert d.retry_after_header() == "31"
    assert not (await rl.check("r", None, 1, now=31.5)).allowed
    assert (await rl.check("r", None, 1, now=31.6)).allowed


async def test_output_limit_lets_requests_in_while_one_token_remains():
    rl = limiter(outputTokensPerUnit=100, unit="minute")
    await rl.record_output("r", None, 99, now=0.0)
    assert (await rl.check("r", None, 1, now=0.0)).allowed
    assert (await rl.check("r", None, 1, now=0.0)).allowed  # checking spends no output
    await rl.record_output("r", None, 1, now=0.0)
    assert (await rl.check("r", None, 1, now=0.0)).limit == "output"


async def test_output_denial_spends_no_input():
    rl = limiter(inputTokensPerUnit=100, outputTokensPerUnit=100, unit="minute")
    await rl.record_output("r", None, 100, now=0.0)
    assert (await rl.check("r", None, 100, now=0.0)).limit == "output"
    assert rl.input.level("r", now=0.0) == 100


async def test_when_both_limits_deny_the_longer_wait_is_named():
    rl = limiter(inputTokensPerUnit=60, outputTokensPerUnit=60, unit="minute")  # 1 token/s
    assert (await rl.check("r", None, 60, now=0.0)).allowed
    await rl.record_output("r", None, 69, now=0.0)  # output at -9: 10 s to one token
    d = await rl.check("r", None, 5, now=0.0)  # input needs 5 s
    assert (d.limit, d.retry_after) == ("output", pytest.approx(10.0))
    d = await rl.check("r", None, 30, now=0.0)  # input needs 30 s
    assert (d.limit, d.retry_after) == ("input", pytest.approx(30.0))


async def test_output_without_an_output_limit_is_ignored():
    rl = limiter(inputTokensPerUnit=10)
    await rl.record_output("r", None, 10**9, now=0.0)
    assert (await rl.check("r", None, 10, now=0.0)).allowed


async def test_denials_are_counted_by_limit():
    metrics = RateLimitMetrics()
    rl = RateLimiter.from_spec({"inputTokensPerUnit": 1, "outputTokensPerUnit": 1}, metrics=metrics)
    await rl.check("r", None, 1, now=0.0)
    await rl.check("r", None, 1, now=0.0)
    await rl.record_output("r", None, 5, now=0.0)
    await rl.check("r", None, 0, now=0.0)
    value = metrics.registry.get_sample_value
    assert value("infergate_epp_ratelimit_denied_total", {"limit": "input"}) == 1
    assert value("infergate_epp_ratelimit_denied_total", {"limit": "output"}) == 1


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.001, "1"), (0.6, "1"), (1.0, "1"), (2.0000001, "3"), (59.4, "60")],
)
def test_retry_after_header_rounds_up_to_whole_seconds(retry_after, header):
    d = Decision(False, limit="input", tokens_per_unit=1, unit="second", retry_after=retry_after)
    assert d.retry_after_header() == header


async def test_negative_input_is_a_caller_bug():
    with pytest.raises(ValueError):
        await limiter(inputTokensPerUnit=1).check("r", None, -1)


async def test_build_limiter_picks_the_backend_from_the_spec():
    local = build_limiter({"inputTokensPerUnit": 5})
    assert isinstance(local, RateLimiter)
    spec = {"inputTokensPerUnit": 5, "global": {"redis": {"address": "127.0.0.1:1"}}}
    own = build_limiter(spec)  # no connection is made until the first check
    assert isinstance(own, RedisRateLimiter) and own.owns_client
    await own.aclose()
    clients = RedisClients()
    a = build_limiter(spec, redis_clients=clients)
    b = build_limiter({**spec, "unit": "day"}, redis_clients=clients)
    assert isinstance(a, RedisRateLimiter) and a.client is b.client and not a.owns_client
    await clients.aclose()
