"""Token buckets for a route's token budget, kept in this process.

One `TokenBuckets` holds every bucket of one limit (say, a route's input tokens), keyed by
whatever the caller chooses: the route, or (route, user). A bucket holds at most `capacity`
tokens (the limit per unit) and refills continuously at `capacity / unit_seconds` tokens a
second, so a full bucket admits a burst of `capacity` tokens and after that `capacity` per unit.
A bucket nobody has touched is full; buckets that have refilled to full are dropped now and
then, so memory follows the number of recently active keys.

Two ways to spend tokens:

- `try_take(key, n, now)` spends `n` tokens only if the bucket holds `n`: the input limit,
  where the real prompt token count is known before dispatch.
- `charge(key, n, now)` spends `n` tokens unconditionally, and may drive the bucket negative:
  the output limit, where the count arrives with the response's usage, after the tokens were
  generated. A bucket in debt refills towards zero first, so the route (or user) waits until
  the debt is paid back before `available(key, 1, now)` passes again. Debt is not capped: a
  response of 10 × the limit blocks the key for 10 units. This is the Kthena router's policy
  too (check ≥ 1 output token before, charge the real count after).

Times are seconds on any monotonic clock (the caller passes `now`, tests inject it); the
buckets never read a clock themselves unless `now` is left out, when `time.monotonic()` is used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from infergw.api.networking import DEFAULT_RATE_UNIT, RATE_UNIT_SECONDS, RATE_UNITS

__all__ = ["Take", "TokenBuckets", "parse_unit"]


def parse_unit(unit: str | None) -> int:
    """Seconds in a ModelRoute `rateLimit.unit` (`second|minute|hour|day`; None means the
    CRD's default, `second`). Anything else is a ValueError naming the allowed values."""
    if unit is None:
        unit = DEFAULT_RATE_UNIT
    seconds = RATE_UNIT_SECONDS.get(unit) if isinstance(unit, str) else None
    if seconds is None:
        raise ValueError(f"unit: must be one of {', '.join(RATE_UNITS)}, not {unit!r}")
    return seconds


@dataclass(slots=True, frozen=True)
class Take:
    """What a bucket said. `retry_after` is 0 when allowed, the seconds until the bucket will
    hold enough when denied, and `math.inf` when it never will (`n` above the capacity)."""

    allowed: bool
    retry_after: float = 0.0


ALLOWED = Take(True)

# Refill is float arithmetic: a caller retrying exactly after `retry_after` may find the bucket
# short by a rounding error (0.1 s × 10/s = 0.9999…). Tokens this close count as there.
EPSILON = 1e-9


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Buckets of one limit: `capacity` tokens per `unit_seconds`, one bucket per key."""

    __slots__ = ("_buckets", "_next_prune", "capacity", "rate", "unit_seconds")

    PRUNE_FLOOR = 1024

    def __init__(self, capacity: int, unit_seconds: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if unit_seconds <= 0:
            raise ValueError(f"unit_seconds must be positive, not {unit_seconds}")
        self.capacity = capacity
        self.unit_seconds = unit_seconds
        self.rate = capacity / unit_seconds  # tokens per second
        self._buckets: dict[object, _Bucket] = {}
        self._next_prune = self.PRUNE_FLOOR

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, key: object, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._next_prune:
                self.prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.capacity), now)
            return bucket
        elapsed = now - bucket.updated
        if elapsed > 0:  # a clock that steps back refills nothing rather than draining
            bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        return bucket

    def level(self, key: object, now: float | None = None) -> float:
        """Tokens in the bucket at `now` (negative while in debt)."""
        if now is None:
            now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.capacity)
        return min(self.capacity, bucket.tokens + max(0.0, now - bucket.updated) * self.rate)

    def _wait(self, tokens: float, n: float) -> float:
        if n > self.capacity:
            return math.inf
        return (n - tokens) / self.rate

    def available(self, key: object, n: float = 1, now: float | None = None) -> Take:
        """Whether the bucket holds `n` tokens now, spending nothing."""
        if now is None:
            now = time.monotonic()
        tokens = self.level(key, now)
        if tokens + EPSILON >= n:
            return ALLOWED
        return Take(False, self._wait(tokens, n))

    def try_take(self, key: object, n: float, now: float | None = None) -> Take:
        """Spend `n` tokens if the bucket holds them; otherwise spend nothing and say how long
        until it will (math.inf when `n` exceeds the capacity: waiting cannot help)."""
        if n < 0:
            raise ValueError(f"cannot take {n} tokens")
        if now is None:
            now = time.monotonic()
        bucket = self._refilled(key, now)
        if bucket.tokens + EPSILON >= n:
            bucket.tokens -= n
            return ALLOWED
        return Take(False, self._wait(bucket.tokens, n))

    def charge(self, key: object, n: float, now: float | None = None) -> float:
        """Spend `n` tokens whatever the bucket holds (it may go negative); returns the level."""
        if n < 0:
            raise ValueError(f"cannot charge {n} tokens")
        if now is None:
            now = time.monotonic()
        bucket = self._refilled(key, now)
        bucket.tokens -= n
        return bucket.tokens

    def give_back(self, key: object, n: float, now: float | None = None) -> float:
        """Return `n` tokens taken for a request that was never served (never above the
        capacity); returns the level."""
        if n < 0:
            raise ValueError(f"cannot give back {n} tokens")
        if now is None:
            now = time.monotonic()
        bucket = self._refilled(key, now)
        bucket.tokens = min(float(self.capacity), bucket.tokens + n)
        return bucket.tokens

    def prune(self, now: float | None = None) -> int:
        """Drop buckets that have refilled to full (they equal a missing one); returns how many.
        Runs by itself when the number of buckets doubles, so callers need not."""
        if now is None:
            now = time.monotonic()
        full = [
            key
            for key, b in self._buckets.items()
            if b.tokens + max(0.0, now - b.updated) * self.rate >= self.capacity
        ]
        for key in full:
            del self._buckets[key]
        self._next_prune = max(self.PRUNE_FLOOR, 2 * len(self._buckets))
        return len(full)
