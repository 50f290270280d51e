"""How often to scrape one pod: at the configured interval while it works, seldom while idle.

Scraping is not free for the pod: rendering a real vLLM /metrics page (55 KB) every 50 ms
costs an idle engine about a tenth of a core. An idle pod's numbers cannot change while
nobody sends it anything, and the picker knows what it sends: a pod whose last page said
nothing runs or waits, to which this picker has nothing in flight and has sent nothing since,
rests — it is scraped every `idle_interval`, and meanwhile the scraper vouches for its last
numbers (their age stays that of the last check, so they never go stale). The first request
routed to it wakes it: the next round is at most one manager tick (`interval`) away.

What the picker cannot see: requests another picker replica or a client bypassing the
gateway sends to a resting pod. For up to `idle_interval` it looks idler than it is; the
first request this picker routes there, or the next slow scrape, ends that.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergw.epp.datastore import Endpoint

# An idle pod is scraped this often by default: twenty times less than the default
# interval, and still soon enough for load that reaches it past this picker.
DEFAULT_IDLE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Pace:
    interval: float
    idle_interval: float

    @property
    def rests(self) -> bool:
        """False when resting would not lengthen the interval (the feature is off)."""
        return self.idle_interval > self.interval

    def idle(self, ep: Endpoint) -> bool:
        """Nothing to learn from scraping this pod before idle_interval: its last good page
        said it runs and queues nothing, and the picker has sent it nothing since."""
        m = ep.metrics
        return (
            self.rests
            and ep.reachable
            and not ep.stale
            and ep.scrape_failures == 0
            and m.updated_at > 0
            and m.running == 0
            and m.waiting == 0
            and not self.woken(ep)
        )

    @staticmethod
    def woken(ep: Endpoint) -> bool:
        """The picker has sent this pod requests its last page cannot show."""
        return ep.inflight_requests > 0 or ep.sent_since_scrape > 0
