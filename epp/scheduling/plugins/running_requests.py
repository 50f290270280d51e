"""running-requests-scorer: fewer requests in the model server's batch is better."""

from __future__ import annotations

from infergw.epp.scheduling.framework import Scorer
from infergw.epp.scheduling.plugins._normalize import lower_is_better


class RunningRequestsScorer(Scorer):
    type_name = "running-requests-scorer"

    def score(self, ctx, endpoints):
        return lower_is_better([float("inf") if e.stale else e.metrics.running for e in endpoints])
