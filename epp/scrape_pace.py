"""How often to scrape one pod: as often as routing can learn something from a new page.

Scraping is not free: rendering a real vLLM /metrics page (55 KB) every 50 ms costs an idle
engine about a tenth of a core, and fetching and reading it costs the picker about a
millisecond of CPU a page. Eight busy pods at the fast interval are 160 pages a second
whatever the request rate. But between two pages a pod's numbers move only with what is
sent to it, and the picker knows what it sends. So a pod is scraped at one of three paces:

- **fast** (`interval`): the picker sent it something its last page cannot show, its last
  page failed, or requests wait in flow control for room (a page may release them).
- **quiet** (`quiet_interval`): its last page says it is busy (running or waiting), and the
  picker has sent it nothing since. Its numbers can only fall (requests finish) until the
  picker sends again, and what falls the picker sees first: least-request counts its own
  in-flight requests, fresh at every finish; kv-cache-utilization and flow control's queue
  add what was sent since the page (`sent_since_scrape`). The first request sent wakes it:
  its next page is then at most one manager tick (`interval`) away, as at the fast pace.
  Never vouched for: a quiet pod's numbers age as any others, so the quiet interval is kept
  one `interval` below the staleness bounds (`stale_bound`) and a quiet pod is never stale.
- **resting** (`idle_interval`): its last page says nothing runs or waits, the picker has
  nothing in flight there and has sent it nothing since. An idle pod's numbers cannot change
  while nobody sends it anything, so the scraper vouches for them (their age stays that of
  the last check, so they never go stale). The first request routed to it wakes it.

What the picker cannot see: requests a client bypassing the gateway sends to a pod. For up to
`quiet_interval` (busy) or `idle_interval` (idle) it looks idler than it is; the first request
this picker routes there, or the next page, ends that. With shared scraping (several replicas,
epp/scrape_shares.py) a pod's owner paces it, and a replica that sends a quiet or resting pod
a request wakes the owner through the shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergw.epp.datastore import Endpoint

# A pod is scraped this often by default (--refresh-metrics-interval): busy pods' pace.
DEFAULT_REFRESH_INTERVAL = 0.05
# An idle pod is scraped this often by default: twenty times less than the default
# interval, and still soon enough for load that reaches it past this picker.
DEFAULT_IDLE_INTERVAL = 1.0
# A busy pod the picker sends nothing is scraped at most this seldom by default; the
# staleness bounds shorten it (Pace.of): 200 ms under the picker's default 250 ms, 150 ms
# under flow control's default 200 ms when flow control runs.
DEFAULT_QUIET_INTERVAL = 0.25

FAST, QUIET, RESTING = "fast", "quiet", "resting"


@dataclass(frozen=True, slots=True)
class Pace:
    interval: float
    idle_interval: float
    quiet_interval: float = 0.0  # 0 or at most `interval`: busy pods keep the fast pace

    @classmethod
    def of(
        cls, interval: float, idle_interval: float, quiet_interval: float, stale_bound: float
    ) -> Pace:
        """The pace, its quiet interval kept one `interval` below `stale_bound` (the
        shortest staleness any reader of the numbers applies), so that a quiet pod's page
        always comes before its numbers would go stale."""
        return cls(interval, idle_interval, min(quiet_interval, stale_bound - interval))

    @property
    def rests(self) -> bool:
        """False when resting would not lengthen the interval (the feature is off)."""
        return self.idle_interval > self.interval

    @property
    def quiets(self) -> bool:
        """False when the quiet pace would not lengthen the interval (the feature is off)."""
        return self.quiet_interval > self.interval

    def idle(self, ep: Endpoint) -> bool:
        """Nothing to learn from scraping this pod before idle_interval: its last good page
        said it runs and queues nothing, and the picker has sent it nothing since."""
        m = ep.metrics
        return (
            self.rests and _fresh(ep) and m.running == 0 and m.waiting == 0 and not self.woken(ep)
        )

    def quiet(self, ep: Endpoint) -> bool:
        """Busy by its last good page, and sent nothing since: its numbers can only fall
        until the picker sends it something, and the picker's own counts show that first."""
        m = ep.metrics
        return (
            self.quiets
            and _fresh(ep)
            and (m.running > 0 or m.waiting > 0)
            and ep.sent_since_scrape == 0
        )

    def pace(self, ep: Endpoint) -> str:
        """FAST, QUIET or RESTING: the pace of the pod's next wait, after a good page."""
        if self.idle(ep):
            return RESTING
        if self.quiet(ep):
            return QUIET
        return FAST

    def wait_for(self, pace: str) -> float:
        """The longest wait before the next page at that pace."""
        if pace == RESTING:
            return self.idle_interval
        if pace == QUIET:
            return self.quiet_interval
        return self.interval

    def wakes(self, pace: str, ep: Endpoint) -> bool:
        """Whether what the picker did since the last page ends a wait at that pace."""
        if pace == RESTING:
            return self.woken(ep)
        if pace == QUIET:
            return ep.sent_since_scrape > 0
        return False

    @staticmethod
    def woken(ep: Endpoint) -> bool:
        """The picker has sent this pod requests its last page cannot show."""
        return ep.inflight_requests > 0 or ep.sent_since_scrape > 0


def _fresh(ep: Endpoint) -> bool:
    """Its last round was a good page, recent enough."""
    return ep.reachable and not ep.stale and ep.scrape_failures == 0 and ep.metrics.updated_at > 0
