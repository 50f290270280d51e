"""A route's token rate limit (ModelRoute `spec.rateLimit`), as the picker asks it.

The picker calls two things per request:

1. before dispatch, with the real prompt token count::

       decision = await limiter.check(route, user, input_tokens)
       if not decision.allowed:
           # 429, header Retry-After: decision.retry_after_header() (None: send no header),
           # body message: decision.message()

2. when the response's usage arrives::

       await limiter.record_output(route, user, completion_tokens)

Policy (same as the Kthena router's, plus per-user budgets):

- input: `check` takes `input_tokens` from the input bucket, or denies and takes nothing. A
  prompt larger than the whole budget is denied with `retry_after=None`: waiting cannot help.
- output: the count is unknown before the response, so `check` only requires the output
  bucket to hold at least one token, and `record_output` charges the real count afterwards,
  possibly driving the bucket negative; later requests are denied until it has refilled.
- a request denied by either limit spends nothing from the other. When both deny, the decision
  names the one with the longer wait, and Retry-After is that wait (the request needs both).
- keys: one budget per route, or per (route, user) with `perUser`; with `perUser`, requests
  without a verified user share one anonymous budget of that route.

`RateLimiter` keeps the buckets in this process; `redis_backend.RedisRateLimiter` has the same
semantics shared between picker replicas (`rateLimit.global.redis`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter

from infergw.api.networking import DEFAULT_RATE_UNIT
from infergw.epp.ratelimit.buckets import TokenBuckets, parse_unit

__all__ = [
    "ALLOWED",
    "Decision",
    "Limiter",
    "RateLimitConfig",
    "RateLimitMetrics",
    "RateLimiter",
]

INPUT = "input"
OUTPUT = "output"
UNAVAILABLE = "unavailable"  # a shared backend that could not be asked, with fail_open=False


@dataclass(slots=True, frozen=True)
class RateLimitConfig:
    """A validated `rateLimit`: at least one of the two limits, tokens per `unit`."""

    input_tokens_per_unit: int | None = None
    output_tokens_per_unit: int | None = None
    unit: str = DEFAULT_RATE_UNIT
    per_user: bool = False
    redis_address: str | None = None  # rateLimit.global.redis.address: share through Redis

    def __post_init__(self) -> None:
        if self.input_tokens_per_unit is None and self.output_tokens_per_unit is None:
            raise ValueError("rateLimit: set inputTokensPerUnit or outputTokensPerUnit")
        for name, value in (
            ("inputTokensPerUnit", self.input_tokens_per_unit),
            ("outputTokensPerUnit", self.output_tokens_per_unit),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"rateLimit.{name}: must be an integer of at least 1")
        try:
            parse_unit(self.unit)
        except ValueError as e:
            raise ValueError(f"rateLimit.{e}") from None
        if not isinstance(self.per_user, bool):
            raise ValueError("rateLimit.perUser: must be a boolean")
        if self.redis_address is not None:
            host, _, port = self.redis_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("rateLimit.global.redis.address: must be host:port")

    @property
    def unit_seconds(self) -> int:
        return parse_unit(self.unit)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | msgspec.Struct) -> RateLimitConfig:
        """From a ModelRoute's `spec.rateLimit`: the camelCase dict of the manifest, or the
        typed `api.networking.RateLimit`. Raises ValueError with the field's path."""
        if isinstance(spec, msgspec.Struct):
            spec = msgspec.to_builtins(spec)
        if not isinstance(spec, Mapping):
            raise ValueError("rateLimit: must be an object")
        unknown = set(spec) - {
            "inputTokensPerUnit",
            "outputTokensPerUnit",
            "unit",
            "perUser",
            "global",
        }
        if unknown:
            raise ValueError(f"rateLimit: unknown field {sorted(unknown)[0]!r}")
        address = None
        glob = spec.get("global")
        if glob is not None:
            redis = glob.get("redis") if isinstance(glob, Mapping) else None
            address = redis.get("address") if isinstance(redis, Mapping) else None
            if not isinstance(address, str):
                raise ValueError("rateLimit.global.redis.address: required")
        unit, per_user = spec.get("unit"), spec.get("perUser")
        return cls(
            input_tokens_per_unit=spec.get("inputTokensPerUnit"),
            output_tokens_per_unit=spec.get("outputTokensPerUnit"),
            unit=DEFAULT_RATE_UNIT if unit is None else unit,
            per_user=False if per_user is None else per_user,
            redis_address=address,
        )


@dataclass(slots=True, frozen=True)
class Decision:
    """The answer to `check`. When denied: `limit` is "input" or "output" (or "unavailable"
    when a shared backend failed and the limiter fails closed), with that limit's
    `tokens_per_unit` and `unit`; `retry_after` is seconds until a retry can pass, None when
    no wait can (a prompt larger than the budget). `degraded` marks a request let through
    because the shared backend could not be asked (fail open)."""

    allowed: bool
    limit: str | None = None
    tokens_per_unit: int | None = None
    unit: str | None = None
    retry_after: float | None = None
    degraded: bool = False
    requested: int | None = None  # the input tokens asked for, when the input limit denied

    def retry_after_header(self) -> str | None:
        """Retry-After as HTTP wants it: whole seconds, rounded up, at least 1."""
        if self.allowed or self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after - 1e-9)))

    def message(self) -> str:
        if self.allowed:
            return "allowed"
        if self.limit == UNAVAILABLE:
            return "rate limit backend unavailable"
        budget = f"{self.tokens_per_unit} {self.limit} tokens per {self.unit}"
        if self.retry_after is None:
            return f"request has {self.requested} input tokens, more than the limit of {budget}"
        return f"token rate limit exceeded: {budget}"


ALLOWED = Decision(True)


class RateLimitMetrics:
    """Counters for rate limiting, shared by every route's limiter (create one per registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.denied = Counter(
            "infergate_epp_ratelimit_denied_total",
            "Requests denied by a route's token rate limit, by the limit that was hit.",
            ("limit",),
            registry=r,
        )
        self.backend_errors = Counter(
            "infergate_epp_ratelimit_backend_errors_total",
            "Calls to the shared rate limit backend (Redis) that failed, by reason.",
            ("reason",),
            registry=r,
        )
        self.failure_mode_allowed = Counter(
            "infergate_epp_ratelimit_failure_mode_allowed_total",
            "Requests let through unlimited because the shared backend could not be asked.",
            registry=r,
        )
        self.uncharged_output_tokens = Counter(
            "infergate_epp_ratelimit_uncharged_output_tokens_total",
            "Output tokens that could not be charged because the shared backend failed.",
            registry=r,
        )
        self.denied_by = {k: self.denied.labels(k) for k in (INPUT, OUTPUT, UNAVAILABLE)}


class Limiter(Protocol):
    config: RateLimitConfig

    async def check(self, route: str, user: str | None, input_tokens: int) -> Decision: ...

    async def record_output(self, route: str, user: str | None, output_tokens: int) -> None: ...

    async def refund_input(self, route: str, user: str | None, input_tokens: int) -> None: ...

    async def aclose(self) -> None: ...


def deny(config: RateLimitConfig, limit: str, retry_after: float, requested: int) -> Decision:
    """The Decision for a denial by `limit` ("input" or "output"); inf wait becomes None."""
    per_unit = config.input_tokens_per_unit if limit == INPUT else config.output_tokens_per_unit
    return Decision(
        False,
        limit=limit,
        tokens_per_unit=per_unit,
        unit=config.unit,
        retry_after=None if math.isinf(retry_after) else max(0.0, retry_after),
        requested=requested if limit == INPUT else None,
    )


class RateLimiter:
    """A route's token budget, kept in this process (`rateLimit` without `global`)."""

    def __init__(self, config: RateLimitConfig, *, metrics: RateLimitMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else RateLimitMetrics()
        seconds = config.unit_seconds
        self.input = (
            TokenBuckets(config.input_tokens_per_unit, seconds)
            if config.input_tokens_per_unit is not None
            else None
        )
        self.output = (
            TokenBuckets(config.output_tokens_per_unit, seconds)
            if config.output_tokens_per_unit is not None
            else None
        )

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any] | msgspec.Struct, *, metrics: RateLimitMetrics | None = None
    ) -> RateLimiter:
        return cls(RateLimitConfig.from_spec(spec), metrics=metrics)

    def key(self, route: str, user: str | None) -> object:
        return (route, user or "") if self.config.per_user else route

    async def check(
        self, route: str, user: str | None, input_tokens: int, *, now: float | None = None
    ) -> Decision:
        """Admit a request of `input_tokens` prompt tokens, taking them from the input budget,
        or deny it and take nothing. `now`: seconds on the monotonic clock (tests set it)."""
        if input_tokens < 0:
            raise ValueError(f"input_tokens must be at least 0, not {input_tokens}")
        if now is None:
            now = time.monotonic()
        key = self.key(route, user)
        wait_in = wait_out = 0.0
        if self.output is not None:
            out = self.output.available(key, 1, now)
            wait_out = out.retry_after
        if self.input is not None:
            # Nothing is awaited between the checks and the take: one step of the event loop.
            ok = self.input.available(key, input_tokens, now)
            wait_in = ok.retry_after
            if wait_in == 0 and wait_out == 0:
                self.input.try_take(key, input_tokens, now)
                return ALLOWED
        elif wait_out == 0:
            return ALLOWED
        limit, wait = (INPUT, wait_in) if wait_in >= wait_out else (OUTPUT, wait_out)
        self.metrics.denied_by[limit].inc()
        return deny(self.config, limit, wait, input_tokens)

    async def record_output(
        self, route: str, user: str | None, output_tokens: int, *, now: float | None = None
    ) -> None:
        """Charge the response's output tokens (usage.completion_tokens) after the fact."""
        if self.output is None or output_tokens <= 0:
            return
        self.output.charge(self.key(route, user), output_tokens, now)

    async def refund_input(
        self, route: str, user: str | None, input_tokens: int, *, now: float | None = None
    ) -> None:
        """Give back what `check` took for a request that was never served (flow control
        turned it away, or its client left while it waited)."""
        if self.input is None or input_tokens <= 0:
            return
        self.input.give_back(self.key(route, user), input_tokens, now)

    async def aclose(self) -> None:
        return None
