"""A route's token budget shared by every picker replica through Redis (`rateLimit.global`).

Same semantics as `limiter.RateLimiter` (see there), with the buckets in Redis:

- One Lua script does a whole decision — read both buckets, refill, check, take — so Redis runs
  it atomically: concurrent pickers can never both spend the same tokens. It is sent by
  EVALSHA and, when Redis answers NOSCRIPT (restart, SCRIPT FLUSH, failover), by EVAL, which
  also caches it again.
- Time is Redis's own (`TIME` inside the script), so the clocks of picker hosts do not matter.
- A bucket is a hash {t: tokens, s: seconds, u: microseconds} under
  `infergate:ratelimit:{<route>[|<user>]}:input|output` (the braces keep a route's two buckets
  in one cluster slot). Every write sets the key to expire when the bucket would have refilled
  to full, plus a margin; a missing key means a full bucket, so expiry loses nothing and idle
  routes and users leave nothing behind.

When Redis cannot be asked (refused, timed out, error reply, or a reply of a shape the script
never returns — a proxy or another server in Redis's place): fail open, like Envoy's rate limit
filter with its default `failure_mode_deny: false` — the request goes through unlimited and
`Decision.degraded` is set, the failure is counted (`backend_errors_total{reason}`,
`failure_mode_allowed_total`), and it is logged at ERROR once, then at most every
`log_interval` seconds while it lasts, with a WARNING when Redis answers again. For
`retry_interval` seconds after a failure the limiter does not call Redis at all, so an outage
costs one timeout per interval, not one per request. Output tokens that could not be charged
are counted (`uncharged_output_tokens_total`) and dropped. `fail_open=False` denies instead,
with `Decision.limit == "unavailable"` (the picker should answer 503). Kthena's router fails
closed (its script error means "not allowed"); we follow Envoy, because a limit's job is to
protect the models, and an outage of the limiter's store should not become an outage of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from infergw.epp.ratelimit.limiter import (
    ALLOWED,
    INPUT,
    OUTPUT,
    UNAVAILABLE,
    Decision,
    RateLimitConfig,
    RateLimitMetrics,
    deny,
)
from infergw.epp.ratelimit.redis_clients import DEFAULT_TIMEOUT, RedisClients
from infergw.epp.ratelimit.redis_parser import MAX_REPLY_BYTES, ReplyTooLarge, bounded_parser

__all__ = ["BUCKET_SCRIPT", "RedisClients", "RedisRateLimiter", "redis_client"]

log = logging.getLogger(__name__)

KEY_PREFIX = "infergate:ratelimit"
TTL_MARGIN_MS = 1000

# KEYS[1] input bucket, KEYS[2] output bucket.
# ARGV: op ("check"|"charge"), input capacity (0: no input limit), output capacity (0: none),
#       unit seconds, tokens (input tokens for check, output tokens for charge), TTL margin ms.
# check  -> {1} | {0, "input"|"output", seconds to wait or "inf"}
# charge -> the output bucket's level afterwards (a string)
BUCKET_SCRIPT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local clock = redis.call('TIME')
local now_s, now_us = tonumber(clock[1]), tonumber(clock[2])
local op = ARGV[1]
local in_cap, out_cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local unit, n, margin = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

local function level(key, cap)
  local v = redis.call('HMGET', key, 't', 's', 'u')
  local t, s, u = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if t == nil or s == nil or u == nil then return cap end
  local dt = (now_s - s) + (now_us - u) / 1000000
  if dt < 0 then dt = 0 end
  return math.min(cap, t + dt * cap / unit)
end

local function store(key, cap, t)
  redis.call('HSET', key, 't', string.format('%.17g', t), 's', clock[1], 'u', clock[2])
  redis.call('PEXPIRE', key, math.ceil((cap - t) * unit * 1000 / cap) + margin)
end

if op == 'charge' then
  local t = level(KEYS[2], out_cap) - n
  store(KEYS[2], out_cap, t)
  return string.format('%.6f', t)
end

if op == 'refund' then
  if in_cap <= 0 then return '0' end
  local t = math.min(in_cap, level(KEYS[1], in_cap) + n)
  store(KEYS[1], in_cap, t)
  return string.format('%.6f', t)
end

local wait_in, wait_out, in_level = 0, 0, 0
if out_cap > 0 then
  local o = level(KEYS[2], out_cap)
  if o + 1e-9 < 1 then wait_out = (1 - o) * unit / out_cap end
end
if in_cap > 0 then
  if n > in_cap then
    wait_in = -1
  else
    in_level = level(KEYS[1], in_cap)
    if in_level + 1e-9 < n then wait_in = (n - in_level) * unit / in_cap end
  end
end
if wait_in == 0 and wait_out == 0 then
  if in_cap > 0 and n > 0 then store(KEYS[1], in_cap, in_level - n) end
  return {1}
end
if wait_in < 0 then return {0, 'input', 'inf'} end
if wait_in >= wait_out then return {0, 'input', string.format('%.6f', wait_in)} end
return {0, 'output', string.format('%.6f', wait_out)}
"""
BUCKET_SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT.encode()).hexdigest()


def redis_client(
    address: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = 32,
    max_reply_bytes: int = MAX_REPLY_BYTES,
) -> Redis:
    """An asyncio client for `host:port` tuned for the request path: short timeouts, one
    immediate retry (for a pooled connection the server closed), at most `max_connections`
    connections, a caller waiting up to `timeout` for a free one, a reply longer than
    `max_reply_bytes` refused as it is read. `redis://host:port` is taken too."""
    address = address.removeprefix("redis://").rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"redis address must be host:port, not {address!r}")
    pool = BlockingConnectionPool(
        host=host.strip("[]"),
        port=int(port),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        max_connections=max_connections,
        timeout=timeout,
        parser_class=bounded_parser(max_reply_bytes),
    )
    return Redis(connection_pool=pool)


class MalformedReply(redis_errors.RedisError):
    """The script answered something it never returns: whatever answers on Redis's address is
    not running it as written. Handled as any Redis error (fail open or closed, counted)."""


@dataclass(frozen=True, slots=True)
class CheckReply:
    """The script's answer to "check": allowed, or the limit hit and the seconds to wait."""

    allowed: bool
    limit: str | None = None
    wait: float = 0.0


T = TypeVar("T")


def _short(reply: Any) -> str:
    """The start of a bad reply, for the log line (it may be arbitrarily large)."""
    return repr(reply)[:80]


def _number(value: Any) -> float:
    """A bulk string holding a number that is not NaN (inf is the script's "never")."""
    if not isinstance(value, bytes):
        raise MalformedReply(f"expected a number as a bulk string, got {_short(value)}")
    try:
        number = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedReply(f"expected a number, got {_short(value)}") from None
    if math.isnan(number):
        raise MalformedReply("expected a number, got NaN")
    return number


def check_reply(reply: Any) -> CheckReply:
    """{1} or {0, "input"|"output", seconds >= 0 or "inf"}; anything else is MalformedReply."""
    if not isinstance(reply, list) or not reply or type(reply[0]) is not int:
        raise MalformedReply(f"check: expected {{1}} or {{0, limit, wait}}, got {_short(reply)}")
    if reply == [1]:
        return CheckReply(True)
    if reply[0] != 0 or len(reply) != 3 or reply[1] not in (INPUT.encode(), OUTPUT.encode()):
        raise MalformedReply(f"check: expected {{1}} or {{0, limit, wait}}, got {_short(reply)}")
    wait = _number(reply[2])
    if wait < 0:
        raise MalformedReply(f"check: negative wait {wait}")
    return CheckReply(False, reply[1].decode(), wait)


def level_reply(reply: Any) -> float:
    """charge and refund answer the bucket's level afterwards (a finite number)."""
    level = _number(reply)
    if math.isinf(level):
        raise MalformedReply(f"expected a finite bucket level, got {level}")
    return level


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(error: BaseException) -> str:
    if isinstance(error, MalformedReply | ReplyTooLarge):
        return "malformed_reply"
    if isinstance(error, TimeoutError | redis_errors.TimeoutError):
        return "timeout"
    if isinstance(error, OSError | redis_errors.ConnectionError):
        return "connection"
    if isinstance(error, redis_errors.ResponseError):
        return "response"
    return "other"


class RedisRateLimiter:
    """A route's token budget in Redis; same API as `limiter.RateLimiter`."""

    def __init__(
        self,
        config: RateLimitConfig,
        client: Redis,
        *,
        fail_open: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        retry_interval: float = 1.0,
        log_interval: float = 30.0,
        metrics: RateLimitMetrics | None = None,
        key_prefix: str = KEY_PREFIX,
        owns_client: bool = False,
    ) -> None:
        self.config = config
        self.client = client
        self.fail_open = fail_open
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.metrics = metrics if metrics is not None else RateLimitMetrics()
        self.key_prefix = key_prefix
        self.owns_client = owns_client
        self.script_loads = 0  # EVALs after NOSCRIPT
        self._caps = (
            str(config.input_tokens_per_unit or 0),
            str(config.output_tokens_per_unit or 0),
            str(config.unit_seconds),
        )
        self._down_since: float | None = None  # monotonic time of the first failure
        self._skip_until = 0.0
        self._logged_at = 0.0

    @classmethod
    def connect(
        cls,
        config: RateLimitConfig | Mapping[str, Any] | msgspec.Struct,
        address: str | None = None,
        **kwargs: Any,
    ) -> RedisRateLimiter:
        """A limiter with its own client for `address` (default: `rateLimit.global.redis`)."""
        if not isinstance(config, RateLimitConfig):
            config = RateLimitConfig.from_spec(config)
        address = address or config.redis_address
        if address is None:
            raise ValueError("rateLimit.global.redis.address: required for a Redis limiter")
        timeout = kwargs.get("timeout", DEFAULT_TIMEOUT)
        return cls(config, redis_client(address, timeout=timeout), owns_client=True, **kwargs)

    @property
    def available(self) -> bool:
        """False while Redis is failing (since the last failed call, until one succeeds)."""
        return self._down_since is None

    def keys(self, route: str, user: str | None) -> tuple[str, str]:
        tag = quote(route, safe="")
        if self.config.per_user:
            tag = f"{tag}|{quote(user or '', safe='')}"
        base = f"{self.key_prefix}:{{{tag}}}"
        return f"{base}:{INPUT}", f"{base}:{OUTPUT}"

    async def _script(self, keys: tuple[str, str], op: str, tokens: int) -> Any:
        args = (op, *self._caps, str(tokens), str(TTL_MARGIN_MS))
        async with asyncio.timeout(self.timeout):
            try:
                return await self.client.evalsha(BUCKET_SCRIPT_SHA, 2, *keys, *args)
            except redis_errors.NoScriptError:
                self.script_loads += 1
                return await self.client.eval(BUCKET_SCRIPT, 2, *keys, *args)

    async def _call(
        self, keys: tuple[str, str], op: str, tokens: int, parse: Callable[[Any], T]
    ) -> T | None:
        """The script's reply through `parse`, or None when Redis could not be asked or
        answered out of shape (counted and logged)."""
        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            reply = parse(await self._script(keys, op, tokens))
        except Exception as error:
            # Not only RedisError: the client itself raises others (AttributeError, …) on a
            # handshake out of shape; whatever it raises, Redis could not be asked.
            self._failed(error, time.monotonic())
            return None
        if self._down_since is not None:
            log.warning(
                "rate limit backend answers again after %.1fs; limits enforced again",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return reply

    def _failed(self, error: BaseException, now: float) -> None:
        self.metrics.backend_errors.labels(_reason(error)).inc()
        self._skip_until = now + self.retry_interval
        first = self._down_since is None
        if first:
            self._down_since = now
        if first or now - self._logged_at >= self.log_interval:
            self._logged_at = now
            log.error(
                "rate limit backend failed (%s: %s); %s for %.1fs before trying again",
                type(error).__name__,
                error,
                "letting requests through unlimited" if self.fail_open else "denying requests",
                self.retry_interval,
            )

    def _unavailable(self) -> Decision:
        if self.fail_open:
            self.metrics.failure_mode_allowed.inc()
            return Decision(True, degraded=True)
        self.metrics.denied_by[UNAVAILABLE].inc()
        return Decision(False, limit=UNAVAILABLE, retry_after=self.retry_interval)

    async def check(self, route: str, user: str | None, input_tokens: int) -> Decision:
        """Admit a request of `input_tokens` prompt tokens, atomically taking them from the
        shared input budget, or deny it and take nothing (see `limiter` for the policy)."""
        if input_tokens < 0:
            raise ValueError(f"input_tokens must be at least 0, not {input_tokens}")
        reply = await self._call(self.keys(route, user), "check", input_tokens, check_reply)
        if reply is None:
            return self._unavailable()
        if reply.allowed:
            return ALLOWED
        assert reply.limit is not None  # check_reply names the limit of every denial
        self.metrics.denied_by[reply.limit].inc()
        return deny(self.config, reply.limit, reply.wait, input_tokens)

    async def record_output(self, route: str, user: str | None, output_tokens: int) -> None:
        """Charge the response's output tokens to the shared output budget (may go negative).
        When Redis fails the tokens are counted as uncharged and dropped; this never raises."""
        if self.config.output_tokens_per_unit is None or output_tokens <= 0:
            return
        keys = self.keys(route, user)
        if await self._call(keys, "charge", output_tokens, level_reply) is None:
            self.metrics.uncharged_output_tokens.inc(output_tokens)

    async def refund_input(self, route: str, user: str | None, input_tokens: int) -> None:
        """Give back input tokens `check` took for a request that was never served; when
        Redis fails they stay spent (logged with the other failures). Never raises."""
        if self.config.input_tokens_per_unit is None or input_tokens <= 0:
            return
        await self._call(self.keys(route, user), "refund", input_tokens, level_reply)

    async def level(self, route: str, user: str | None, which: str) -> float | None:
        """A bucket's stored token count (None: no key, a full bucket), without refill: for
        tests and debugging, never the request path."""
        key = self.keys(route, user)[0 if which == INPUT else 1]
        value = await self.client.hget(key, "t")
        return None if value is None else float(_text(value))

    async def aclose(self) -> None:
        if self.owns_client:
            await self.client.aclose()
