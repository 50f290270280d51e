"""kv-cache-utilization-scorer: 1 − KV-cache usage; stale metrics score 0."""

from __future__ import annotations

from infergw.epp.scheduling.framework import Scorer


class KVCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"

    def score(self, ctx, endpoints):
        return [0.0 if e.stale else 1.0 - e.metrics.kv_usage for e in endpoints]
