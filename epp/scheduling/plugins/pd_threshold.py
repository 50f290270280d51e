"""The P/D decider's threshold, adapted to the load of the two pods a request would use.

    threshold = clamp(nonCachedTokens × (1 + prefillQueueWeight × q) / (1 + decodeBatchWeight × b),
                      minNonCachedTokens, maxNonCachedTokens)

and a request is disaggregated when its uncached prompt tokens on the decode pod reach it.

- b, the decode pod's batch: requests running and waiting there at the last scrape, plus those
  the picker sent it since. Prefilling the prompt on that pod stalls each of them for the
  prefill's steps (the interference disaggregation removes), so the bigger b, the lower the
  threshold: disaggregate more.
- q, the prefill pod's queue: requests waiting and running on the prefill pod the prefill
  profile picked, at its last scrape, plus the prefill legs sent it since. The prefill leg waits
  behind them (time to first token), so the bigger q, the higher the threshold: prefill locally
  more.

- Past saturation the prefill queue grows without bound, the threshold with it, and long
  prompts go to the decode pods, which then drown too. With `decodeQueueLimit` L, a decode pod
  with more than L requests waiting (its last scrape) has no room to prefill for the prefill
  pods: the prefill queue may no longer raise its threshold above nonCachedTokens (the batch
  may still lower it), so long prompts queue on the prefill pods and the decode pods keep
  serving the rest.

Both weights 0 (the default) is the fixed threshold. It is a cost balance: aggregating costs
the b sequences one prefill's time each, disaggregating costs this request q prompts' time
plus a fixed hop and KV pull (nonCachedTokens is that fixed cost, in prompt tokens).

Metrics the decider cannot trust give the fixed threshold, never a guess: an endpoint never
scraped, marked stale by the scraper, or whose numbers are negative or not finite (only the
pods whose term has a weight are read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.params import MAX_TOKENS


@dataclass(frozen=True, slots=True)
class AdaptiveThreshold:
    base: int  # nonCachedTokens; 0: never disaggregate
    decode_batch_weight: float = 0.0
    prefill_queue_weight: float = 0.0
    minimum: int = 1
    maximum: int = MAX_TOKENS
    decode_queue_limit: int | None = None  # None: the prefill queue always raises it

    def __post_init__(self):
        # Bounds that do not bracket the threshold at zero load would make the fixed fallback
        # (stale metrics) and the adapted threshold disagree about an idle fleet.
        if self.minimum > self.maximum:
            raise ValueError(
                f"minNonCachedTokens ({self.minimum}) must not exceed "
                f"maxNonCachedTokens ({self.maximum})"
            )
        if self.base > 0 and not self.minimum <= self.base <= self.maximum:
            raise ValueError(
                f"nonCachedTokens ({self.base}) must lie between minNonCachedTokens "
                f"({self.minimum}) and maxNonCachedTokens ({self.maximum})"
            )

    @property
    def adaptive(self) -> bool:
        return self.decode_batch_weight > 0 or self.prefill_queue_weight > 0

    def tokens(self, decode: Endpoint, prefill: Endpoint) -> int:
        """The threshold for a request picked onto `decode` whose prefill leg would go to
        `prefill`."""
        if self.base <= 0 or not self.adaptive:
            return self.base
        b, q = self._batch(decode), self._backlog(prefill)
        if b is None or q is None:
            return self.base  # an input the decider cannot trust: the fixed threshold
        if self._full(decode):
            return min(self.base, self._formula(b, q))
        return self._formula(b, q)

    def lowest(self, decode: Endpoint) -> int:
        """The smallest threshold any prefill pod could give (q = 0, or the fixed threshold
        when the decode pod's metrics are missing): a request below it stays on the decode
        pod without running the prefill profile. Never above nonCachedTokens, as the bounds
        bracket it."""
        if self.base <= 0 or not self.adaptive:
            return self.base
        b = self._batch(decode)
        return self.base if b is None else self._formula(b, 0.0)

    def _full(self, decode: Endpoint) -> bool:
        """The decode pod has a queue of its own past the limit (read only with a limit)."""
        if self.decode_queue_limit is None:
            return False
        waiting = _count(decode.metrics.waiting)
        return waiting is not None and waiting > self.decode_queue_limit

    # An input whose weight is 0 is not read: its metrics need not be there.
    def _batch(self, decode: Endpoint) -> float | None:
        return batch(decode) if self.decode_batch_weight > 0 else 0.0

    def _backlog(self, prefill: Endpoint) -> float | None:
        return backlog(prefill) if self.prefill_queue_weight > 0 else 0.0

    def _formula(self, b: float, q: float) -> int:
        t = self.base * (1 + self.prefill_queue_weight * q) / (1 + self.decode_batch_weight * b)
        # Clamped as a float first: a huge queue times a huge weight may overflow to inf.
        return math.ceil(min(float(self.maximum), max(float(self.minimum), t)))


def _fresh(e: Endpoint) -> bool:
    return not e.stale and e.metrics.updated_at > 0


def _count(*values: float) -> float | None:
    """The sum of scraped counts, None if any is not a count (NaN, inf, negative)."""
    total = 0.0
    for v in values:
        if not math.isfinite(v) or v < 0:
            return None
        total += v
    return total


def batch(decode: Endpoint) -> float | None:
    """b: the sequences a prefill on `decode` would stall; None when its metrics are missing."""
    if not _fresh(decode):
        return None
    m = decode.metrics
    return _count(m.running, m.waiting, float(decode.sent_since_scrape))


def backlog(prefill: Endpoint) -> float | None:
    """q: the prompts ahead of a prefill leg on `prefill`; None when its metrics are missing."""
    if not _fresh(prefill):
        return None
    m = prefill.metrics
    return _count(m.running, m.waiting, float(prefill.sent_since_scrape))
