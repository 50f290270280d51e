"""least-request: the picker's own in-flight counts, which are fresh even between scrapes.

A request just sent is still prefilling, the costly part of its life; one sent a while ago is
decoding or nearly done. So the newest request sent to a pod counts as up to one more, its
weight falling from 1 to 0 over `recentSeconds` (default: the pod's TTFT moving average, else
0.5 s; 0 turns it off). Among pods with equal counts, the one sent to longest ago wins, as
round robin would choose: on traffic with no reuse, picking at random among them lets two
prefills meet on one pod while another pod's request is only decoding (tests/epp/scheduling/
test_load_balance.py replays it).

`low-queue-filter` drops pods whose model server reports more than `threshold` waiting
requests, unless that would drop every pod.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.framework import Filter, Scorer
from infergw.epp.scheduling.params import MAX_ENTRIES, PluginParams, parse_params
from infergw.epp.scheduling.plugins._normalize import lower_is_better

DEFAULT_RECENT_S = 0.5


class LeastRequestParams(PluginParams):
    # "requests" counts in-flight requests; "tokens" weighs them by prompt + max tokens.
    by: Literal["requests", "tokens"] = "requests"
    # None: each pod's TTFT moving average (else DEFAULT_RECENT_S); 0: no recency term.
    recent_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


class LowQueueParams(PluginParams):
    threshold: Annotated[float, msgspec.Meta(ge=0, le=MAX_ENTRIES)] = 128.0


class LeastRequestScorer(Scorer):
    type_name = "least-request"
    params_type = LeastRequestParams

    def __init__(self, name, params=None, clock: Callable[[], float] = time.monotonic):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.by = p.by
        self.recent_s = p.recent_seconds
        self.clock = clock

    def score(self, ctx, endpoints):
        now = self.clock()
        return lower_is_better([self.load(e, now) for e in endpoints])

    def load(self, e: Endpoint, now: float) -> float:
        """In-flight requests (or tokens), the newest counting once more while it is recent."""
        n = e.inflight_requests
        unit = e.inflight_tokens / n if self.by == "tokens" and n else 1.0
        base = float(e.inflight_tokens) if self.by == "tokens" else float(n)
        if not n or not e.last_sent_at or self.recent_s == 0:
            return base
        window = self.recent_s if self.recent_s is not None else e.ttft_ewma or DEFAULT_RECENT_S
        return base + unit * max(0.0, 1.0 - (now - e.last_sent_at) / window)


class LowQueueFilter(Filter):
    type_name = "low-queue-filter"
    params_type = LowQueueParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.threshold = parse_params(self.params_type, self.params).threshold

    def filter(self, ctx, endpoints):
        kept = [e for e in endpoints if not e.stale and e.metrics.waiting <= self.threshold]
        return kept or endpoints
