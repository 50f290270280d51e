"""RedisRateLimiter against a real redis-server: the same semantics as the in-process limiter,
one budget shared by separate picker processes, atomic under concurrency, idle keys expiring,
NOSCRIPT recovery, and failing open (or closed) when Redis is down.

Run as `python -m tests.epp.ratelimit.test_redis worker ...` this module is the picker-like
worker process of the multi-process test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import pytest

from infergw.api.lifetime import spawn
from infergw.epp.ratelimit import RateLimitConfig, RateLimiter, RateLimitMetrics, RedisRateLimiter
from infergw.epp.ratelimit.redis_backend import TTL_MARGIN_MS
from tests import redis_server as redis_fixtures
from tests.conftest import free_port
from tests.paths import ROOT
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

ERRORS = "infergate_epp_ratelimit_backend_errors_total"
ALLOWED_ANYWAY = "infergate_epp_ratelimit_failure_mode_allowed_total"


@asynccontextmanager
async def connected(address: str, **spec):
    kwargs = {
        k: spec.pop(k) for k in ("fail_open", "retry_interval", "timeout", "metrics") if k in spec
    }
    kwargs.setdefault("timeout", 5.0)  # generous: the machine may be busy; outages test less
    limiter = RedisRateLimiter.connect(RateLimitConfig.from_spec(spec), address, **kwargs)
    try:
        yield limiter
    finally:
        await limiter.aclose()


# ---- same semantics as the in-process limiter ---------------------------------------------------


@asynccontextmanager
async def either(backend: str, server: RedisServer | None, **spec):
    if backend == "local":
        yield RateLimiter.from_spec(spec)
    else:
        async with connected(server.address, **spec) as limiter:
            yield limiter


@pytest.fixture(params=["local", "redis"])
def backend(request):
    if request.param == "local":
        return "local", None
    return "redis", request.getfixturevalue("redis_server")


async def test_hundred_per_minute_then_retry_after(backend):
    async with either(*backend, inputTokensPerUnit=100, unit="minute") as rl:
        started = time.monotonic()
        results = [await rl.check("chat", None, 1) for _ in range(100)]
        assert all(d.allowed and not d.degraded for d in results)
        d = await rl.check("chat", None, 1)
        elapsed = time.monotonic() - started
        assert (d.allowed, d.limit, d.tokens_per_unit, d.unit) == (False, "input", 100, "minute")
        # 0.6 s a token, less whatever refilled while the hundred were taken.
        assert 0.6 - elapsed - 1e-6 <= d.retry_after <= 0.6 + 1e-6
        assert d.retry_after_header() == "1"


async def test_a_refund_gives_back_input_up_to_the_budget(backend):
    async with either(*backend, inputTokensPerUnit=100, unit="day") as rl:
        assert (await rl.check("chat", "ann", 80)).allowed
        assert not (await rl.check("chat", "ann", 80)).allowed  # 20 left
        await rl.refund_input("chat", "ann", 80)  # the first was never served
        assert (await rl.check("chat", "ann", 80)).allowed
        await rl.refund_input("chat", "ann", 500)  # never above the budget
        assert (await rl.check("chat", "ann", 100)).allowed
        assert not (await rl.check("chat", "ann", 1)).allowed


async def test_per_user_separation(backend):
    async with either(*backend, inputTokensPerUnit=10, unit="day", perUser=True) as rl:
        assert (await rl.check("r", "alice", 10)).allowed
        assert (await rl.check("r", "alice", 1)).limit == "input"
        assert (await rl.check("r", "bob", 10)).allowed
        assert (await rl.check("r2", "alice", 10)).allowed
        assert (await rl.check("r", None, 10)).allowed
        assert not (await rl.check("r", None, 1)).allowed


async def test_output_charge_drives_later_denial(backend):
    async with either(
        *backend, inputTokensPerUnit=100, outputTokensPerUnit=100, unit="minute"
    ) as rl:
        assert (await rl.check("r", None, 10)).allowed
        await rl.record_output("r", None, 150)
        d = await rl.check("r", None, 10)
        assert (d.limit, d.tokens_per_unit) == ("output", 100)
        assert 30.0 < d.retry_after <= 30.6 + 1e-6  # 51 tokens at 100/60 per second
        assert d.retry_after_header() == "31"


async def test_prompt_above_the_budget_never_passes(backend):
    async with either(*backend, inputTokensPerUnit=100) as rl:
        d = await rl.check("r", None, 101)
        assert d.limit == "input" and d.retry_after is None and d.requested == 101
        assert (await rl.check("r", None, 100)).allowed


async def test_both_limits_deny_names_the_longer_wait(backend):
    async with either(*backend, inputTokensPerUnit=60, outputTokensPerUnit=60, unit="minute") as rl:
        assert (await rl.check("r", None, 60)).allowed
        await rl.record_output("r", None, 69)
        assert (await rl.check("r", None, 5)).limit == "output"
        assert (await rl.check("r", None, 30)).limit == "input"


# ---- Redis specifics ----------------------------------------------------------------------------


async def test_buckets_use_redis_time_and_readable_keys(redis_server):
    async with connected(redis_server.address, inputTokensPerUnit=10, perUser=True) as rl:
        assert rl.keys("my:route", "u{1}") == (
            "infergate:ratelimit:{my%3Aroute|u%7B1%7D}:input",
            "infergate:ratelimit:{my%3Aroute|u%7B1%7D}:output",
        )
        assert (await rl.check("my:route", "u{1}", 4)).allowed
        stored = await rl.client.hgetall(rl.keys("my:route", "u{1}")[0])
        server_s, _ = await rl.client.time()
        assert float(stored[b"t"]) == pytest.approx(6)
        assert abs(int(stored[b"s"]) - server_s) <= 1


async def test_concurrent_checks_are_atomic(redis_server):
    """400 concurrent checks from 4 clients (many connections) on a 50-token budget admit
    exactly 50: no two callers ever spend the same tokens."""
    limiters = [
        RedisRateLimiter.connect(
            RateLimitConfig(input_tokens_per_unit=50, unit="day"), redis_server.address, timeout=10
        )
        for _ in range(4)
    ]
    try:
        results = await asyncio.gather(*(limiters[i % 4].check("r", None, 1) for i in range(400)))
        assert not any(d.degraded for d in results)
        assert sum(d.allowed for d in results) == 50
        # Uneven sizes: 7-token requests into a fresh 50-token budget admit exactly 7.
        results = await asyncio.gather(*(limiters[i % 4].check("r7", None, 7) for i in range(100)))
        assert sum(d.allowed for d in results) == 7
        # Concurrent charges all land: 100 × 3 output tokens.
        out = RedisRateLimiter.connect(
            RateLimitConfig(output_tokens_per_unit=1000, unit="day"),
            redis_server.address,
            timeout=10,  # as above: a charge that times out on a loaded machine is dropped
        )
        await asyncio.gather(*(out.record_output("o", None, 3) for _ in range(100)))
        assert await out.level("o", None, "output") == pytest.approx(700, abs=0.1)
        await out.aclose()
    finally:
        for limiter in limiters:
            await limiter.aclose()


async def test_idle_keys_expire_when_their_bucket_would_be_full(redis_server):
    async with connected(
        redis_server.address, inputTokensPerUnit=5, outputTokensPerUnit=5, perUser=True
    ) as rl:
        for user in ("a", "b", "c"):
            assert (await rl.check("r", user, 5)).allowed
        in_key, out_key = rl.keys("r", "a")
        assert 0 < await rl.client.pttl(in_key) <= 1000 + TTL_MARGIN_MS  # empty: 1 s to full
        await rl.record_output("r", "a", 10)  # 5 - 10 = -5: 2 s to full
        assert 2000 < await rl.client.pttl(out_key) <= 2000 + TTL_MARGIN_MS
        assert not (await rl.check("r", "a", 1)).allowed
        deadline = time.monotonic() + 10
        while await rl.client.keys("infergate:ratelimit:*"):
            assert time.monotonic() < deadline, "rate limit keys did not expire"
            await asyncio.sleep(0.2)
        # A missing key is a full bucket: nothing was lost by expiring.
        assert (await rl.check("r", "a", 5)).allowed


async def test_noscript_falls_back_to_eval(redis_server):
    async with connected(redis_server.address, inputTokensPerUnit=3, unit="day") as rl:
        assert (await rl.check("r", None, 1)).allowed
        assert rl.script_loads == 1  # a fresh server has no script cached
        assert (await rl.check("r", None, 1)).allowed
        assert rl.script_loads == 1
        await rl.client.script_flush()
        assert (await rl.check("r", None, 1)).allowed
        assert rl.script_loads == 2
        assert (await rl.check("r", None, 1)).limit == "input"  # state survived the flush


# ---- picker processes sharing one budget --------------------------------------------------------


async def _worker(address: str, route: str, capacity: int, start_at: float, duration: float):
    config = RateLimitConfig(input_tokens_per_unit=capacity, unit="second")
    limiter = RedisRateLimiter.connect(config, address, timeout=5.0)
    admitted = denied = degraded = 0
    await asyncio.sleep(max(0.0, start_at - time.time()))
    first = time.time()
    while time.time() < first + duration:
        d = await limiter.check(route, None, 1)
        if d.degraded:
            degraded += 1
        elif d.allowed:
            admitted += 1
        else:
            denied += 1
            await asyncio.sleep(0.002)
    last = time.time()
    await limiter.aclose()
    return {
        "admitted": admitted,
        "denied": denied,
        "degraded": degraded,
        "first": first,
        "last": last,
    }


def test_two_picker_processes_share_one_budget(redis_server):
    capacity, duration = 20, 2.0  # 20 tokens a second
    start_at = time.time() + 2.0  # both start together, after their imports
    cmd = [
        sys.executable,
        "-m",
        "tests.epp.ratelimit.test_redis",
        "worker",
        redis_server.address,
        "shared-route",
        str(capacity),
        str(start_at),
        str(duration),
    ]
    procs = [spawn(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    assert all(r["degraded"] == 0 for r in results)
    assert all(r["admitted"] > 0 and r["denied"] > 0 for r in results), results
    total = sum(r["admitted"] for r in results)
    window = max(r["last"] for r in results) - min(r["first"] for r in results)
    # One burst plus the refill over the window; two separate budgets would admit twice that.
    assert capacity <= total <= capacity + capacity * window + 1, (total, window, results)


# ---- Redis down ---------------------------------------------------------------------------------


async def test_fails_open_when_redis_goes_down_and_recovers(redis_server, caplog):
    metrics = RateLimitMetrics()
    async with connected(
        redis_server.address,
        inputTokensPerUnit=3,
        outputTokensPerUnit=100,
        unit="day",
        metrics=metrics,
        retry_interval=0.3,
        timeout=0.5,
    ) as rl:
        assert (await rl.check("r", None, 3)).allowed
        assert (await rl.check("r", None, 1)).limit == "input"
        redis_server.stop()
        caplog.set_level(logging.WARNING, logger="epp.ratelimit.redis_backend")
        started = time.monotonic()
        decisions = [await rl.check("r", None, 1) for _ in range(50)]
        await rl.record_output("r", None, 40)
        assert time.monotonic() - started < 2.0  # an outage must not stall requests
        assert all(d.allowed and d.degraded for d in decisions)
        assert not rl.available
        value = metrics.registry.get_sample_value
        errors = value(ERRORS, {"reason": "connection"})
        # Redis is tried again once per retry_interval, not once per request.
        assert 1 <= errors <= 1 + (time.monotonic() - started) / 0.3
        assert value(ALLOWED_ANYWAY) == 50
        assert value("infergate_epp_ratelimit_uncharged_output_tokens_total") == 40
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(logged) == 1 and "letting requests through" in logged[0].getMessage()

        redis_server.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.35)
        d = await rl.check("r", None, 3)
        assert d.allowed and not d.degraded
        assert (await rl.check("r", None, 1)).limit == "input"  # enforced again
        assert rl.available
        assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_fails_closed_when_asked_to(redis_server):
    async with connected(
        redis_server.address, inputTokensPerUnit=3, fail_open=False, timeout=0.5
    ) as rl:
        redis_server.stop()
        d = await rl.check("r", None, 1)
        assert (d.allowed, d.limit, d.degraded) == (False, "unavailable", False)
        assert d.retry_after_header() == "1"
        assert d.message() == "rate limit backend unavailable"


async def test_redis_never_reachable():
    metrics = RateLimitMetrics()
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with connected(address, inputTokensPerUnit=3, metrics=metrics, timeout=0.5) as rl:
        d = await rl.check("r", None, 1)
        assert d.allowed and d.degraded
        assert metrics.registry.get_sample_value(ERRORS, {"reason": "connection"}) == 1


async def test_a_redis_that_never_answers_times_out():
    async def hold(reader, writer):
        await reader.read(1 << 16)
        await asyncio.sleep(30)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = RateLimitMetrics()
    try:
        async with connected(
            f"127.0.0.1:{port}", inputTokensPerUnit=3, metrics=metrics, timeout=0.3
        ) as rl:
            started = time.monotonic()
            d = await rl.check("r", None, 1)
            assert time.monotonic() - started < 1.5
            assert d.allowed and d.degraded
            assert metrics.registry.get_sample_value(ERRORS, {"reason": "timeout"}) == 1
    finally:
        server.close()


# ---- the fixture itself -------------------------------------------------------------------------


def test_missing_redis_server_installs_once_then_skips_locally_or_fails_in_ci(monkeypatch):
    installs = []
    monkeypatch.setattr(redis_fixtures.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(redis_fixtures.os, "geteuid", lambda: 0)
    monkeypatch.setattr(redis_fixtures, "_install_attempt", None)
    monkeypatch.setattr(
        redis_fixtures, "_apt_get_install", lambda: installs.append(1) or "apt-get said no"
    )
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"not installed.*apt-get said no"):
        redis_fixtures.require_redis_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this must not be skipped"):
        redis_fixtures.require_redis_server()
    assert installs == [1]  # tried once per session, not per test


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    address, route, capacity, start_at, duration = sys.argv[2:7]
    print(
        json.dumps(
            asyncio.run(_worker(address, route, int(capacity), float(start_at), float(duration)))
        )
    )
