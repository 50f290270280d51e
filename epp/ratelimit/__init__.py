"""Token rate limits of ModelRoutes (`spec.rateLimit`): input tokens before dispatch, output
tokens from response usage, per route or per (route, user), in this process or shared through
Redis. `build_limiter` picks the backend from the spec; see `limiter` for the policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from infergw.epp.ratelimit.buckets import Take, TokenBuckets, parse_unit
from infergw.epp.ratelimit.limiter import (
    ALLOWED,
    Decision,
    Limiter,
    RateLimitConfig,
    RateLimiter,
    RateLimitMetrics,
)
from infergw.epp.ratelimit.redis_clients import RedisClients

if TYPE_CHECKING:
    from infergw.epp.ratelimit.redis_backend import RedisRateLimiter

__all__ = [
    "ALLOWED",
    "Decision",
    "Limiter",
    "RateLimitConfig",
    "RateLimitMetrics",
    "RateLimiter",
    "RedisClients",
    "RedisRateLimiter",
    "Take",
    "TokenBuckets",
    "build_limiter",
    "parse_unit",
]


def build_limiter(
    spec: Mapping[str, Any] | msgspec.Struct | RateLimitConfig,
    *,
    metrics: RateLimitMetrics | None = None,
    redis_clients: RedisClients | None = None,
    fail_open: bool = True,
) -> RateLimiter | RedisRateLimiter:
    """The limiter for one route's `rateLimit`: a `RedisRateLimiter` when it names
    `global.redis.address` (on the shared client from `redis_clients`, or a client of its own
    that `aclose()` closes), else an in-process `RateLimiter`. Raises ValueError on a bad spec.
    Pass the same `metrics` to every route's limiter (it owns the Prometheus counters)."""
    config = spec if isinstance(spec, RateLimitConfig) else RateLimitConfig.from_spec(spec)
    if config.redis_address is None:
        return RateLimiter(config, metrics=metrics)
    from infergw.epp.ratelimit.redis_backend import RedisRateLimiter  # redis-py: only when named

    if redis_clients is None:
        return RedisRateLimiter.connect(config, metrics=metrics, fail_open=fail_open)
    return RedisRateLimiter(
        config,
        redis_clients.get(config.redis_address),
        metrics=metrics,
        fail_open=fail_open,
        timeout=redis_clients.timeout,
    )


def __getattr__(name: str) -> Any:
    """`RedisRateLimiter` on first use: importing redis-py costs every picker start CPU, and
    most pickers' routes never name Redis (redis_clients.py)."""
    if name == "RedisRateLimiter":
        from infergw.epp.ratelimit.redis_backend import RedisRateLimiter

        return RedisRateLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
