"""least-request: the picker's own in-flight counts, which are fresh even between scrapes.

`low-queue-filter` drops pods whose model server reports more than `threshold` waiting
requests, unless that would drop every pod.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from infergw.epp.scheduling.framework import Filter, Scorer
from infergw.epp.scheduling.params import MAX_ENTRIES, PluginParams, parse_params
from infergw.epp.scheduling.plugins._normalize import lower_is_better


class LeastRequestParams(PluginParams):
    # "requests" counts in-flight requests; "tokens" weighs them by prompt + max tokens.
    by: Literal["requests", "tokens"] = "requests"


class LowQueueParams(PluginParams):
    threshold: Annotated[float, msgspec.Meta(ge=0, le=MAX_ENTRIES)] = 128.0


class LeastRequestScorer(Scorer):
    type_name = "least-request"
    params_type = LeastRequestParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.by = parse_params(self.params_type, self.params).by

    def score(self, ctx, endpoints):
        if self.by == "tokens":
            return lower_is_better([float(e.inflight_tokens) for e in endpoints])
        return lower_is_better([float(e.inflight_requests) for e in endpoints])


class LowQueueFilter(Filter):
    type_name = "low-queue-filter"
    params_type = LowQueueParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.threshold = parse_params(self.params_type, self.params).threshold

    def filter(self, ctx, endpoints):
        kept = [e for e in endpoints if not e.stale and e.metrics.waiting <= self.threshold]
        return kept or endpoints
