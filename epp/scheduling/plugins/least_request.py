"""least-request: the picker's own in-flight counts, which are fresh even between scrapes.

`low-queue-filter` drops pods whose model server reports more than `threshold` waiting
requests, unless that would drop every pod.
"""

from __future__ import annotations

from epp.scheduling.framework import Filter, Scorer
from epp.scheduling.plugins._normalize import lower_is_better


class LeastRequestScorer(Scorer):
    type_name = "least-request"

    def __init__(self, name, params=None):
        super().__init__(name, params)
        # "requests" counts in-flight requests; "tokens" weighs them by prompt + max tokens.
        self.by = self.params.get("by", "requests")
        if self.by not in ("requests", "tokens"):
            raise ValueError(f"least-request: 'by' must be requests or tokens, got {self.by!r}")

    def score(self, req, endpoints):
        if self.by == "tokens":
            return lower_is_better([float(e.inflight_tokens) for e in endpoints])
        return lower_is_better([float(e.inflight_requests) for e in endpoints])


class LowQueueFilter(Filter):
    type_name = "low-queue-filter"

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.threshold = float(self.params.get("threshold", 128))

    def filter(self, req, endpoints):
        kept = [e for e in endpoints if not e.stale and e.metrics.waiting <= self.threshold]
        return kept or endpoints
