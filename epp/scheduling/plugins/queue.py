"""queue-scorer: fewer waiting requests on the model server is better."""

from __future__ import annotations

from infergw.epp.scheduling.framework import Scorer
from infergw.epp.scheduling.plugins._normalize import lower_is_better


class QueueScorer(Scorer):
    type_name = "queue-scorer"

    def score(self, ctx, endpoints):
        # Stale metrics count as saturated: we do not send work to a pod we cannot see.
        return lower_is_better([float("inf") if e.stale else e.metrics.waiting for e in endpoints])
