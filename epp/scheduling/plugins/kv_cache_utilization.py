"""kv-cache-utilization-scorer: 1 − KV-cache usage; stale metrics score 0.

The usage is the last scrape's plus what the requests the picker sent since will hold (their
mean in-flight tokens over the pod's cache, when its page says its block size and count): a
pod that has just been sent a prompt does not look emptier than one that is decoding only
because the scrape has not seen the prompt yet. Without that, the scorer pulled requests
towards the pod just chosen, more the older the scrape (tests/epp/scheduling/
test_load_balance.py replays it).
"""

from __future__ import annotations

from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.framework import Scorer


def usage_now(e: Endpoint) -> float:
    """The scraped KV usage, plus the picker's requests sent after that scrape, up to 1."""
    m = e.metrics
    if not (e.sent_since_scrape and e.inflight_requests and m.num_blocks and m.block_size):
        return m.kv_usage
    sent = e.sent_since_scrape * e.inflight_tokens / e.inflight_requests
    return min(1.0, m.kv_usage + sent / (m.num_blocks * m.block_size))


class KVCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"

    def score(self, ctx, endpoints):
        return [0.0 if e.stale else 1.0 - usage_now(e) for e in endpoints]
