"""Is an endpoint (and a request's set of candidate endpoints) saturated?

Follows GIE's saturation detector: an endpoint has capacity when its metrics are fresh, its
waiting queue (with the requests the picker sent since the last scrape) is at most
`queue_depth_threshold` and its KV-cache utilization at most
`kv_cache_util_threshold`. A request's candidates are saturated when none has capacity
(no candidates at all counts as saturated: there is nowhere to send it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from infergw.epp.datastore import Endpoint
from infergw.epp.flowcontrol.config import SaturationConfig


def waiting(ep: Endpoint) -> float:
    """The server's queue as last scraped, plus the requests the picker sent it since, which
    its counts cannot show yet: without them, one refresh of free room would let the whole
    queue through before the next scrape."""
    return ep.metrics.waiting + ep.sent_since_scrape


class SaturationDetector:
    def __init__(
        self,
        config: SaturationConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SaturationConfig()
        self.clock = clock  # the clock EndpointMetrics.updated_at is written with

    def stale(self, ep: Endpoint, now: float | None = None) -> bool:
        # Old numbers may hide a queue that has since filled: treat them as no capacity.
        return ep.metrics_age(self.clock() if now is None else now) > self.config.metrics_staleness

    def endpoint_saturated(self, ep: Endpoint, now: float | None = None) -> bool:
        if not ep.reachable or self.stale(ep, now):
            return True
        m, c = ep.metrics, self.config
        return waiting(ep) > c.queue_depth_threshold or m.kv_usage > c.kv_cache_util_threshold

    def saturated(self, candidates: Iterable[Endpoint], now: float | None = None) -> bool:
        """True when no candidate endpoint has capacity."""
        now = self.clock() if now is None else now
        return all(self.endpoint_saturated(ep, now) for ep in candidates)

    def utilization(self, ep: Endpoint, now: float | None = None) -> float:
        """The most constrained resource as a fraction of its threshold (1.0 = at the limit);
        stale or unreachable endpoints count as 1.0. For gauges, not for decisions."""
        if not ep.reachable or self.stale(ep, now):
            return 1.0
        m, c = ep.metrics, self.config
        return max(waiting(ep) / c.queue_depth_threshold, m.kv_usage / c.kv_cache_util_threshold)

    def pool_utilization(self, candidates: Iterable[Endpoint], now: float | None = None) -> float:
        """Mean endpoint utilization (GIE's pool-saturation gauge); 1.0 for no endpoints."""
        now = self.clock() if now is None else now
        values = [self.utilization(ep, now) for ep in candidates]
        return sum(values) / len(values) if values else 1.0
