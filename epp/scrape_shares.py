"""Several picker replicas scrape each pod once between them: its owner scrapes, the others hear.

Why: a pod's /metrics page is not free for the pod. Rendering one costs a real vLLM about
6 ms of CPU (55 KB; ~13 % of a core at the default 50 ms interval) and our simulator 4.3 ms
(46 KB), and every replica scraping every pod multiplies that by the replicas: with four
pickers over four simulator pods the pods spent more CPU rendering pages than serving
(bench/pickers). The numbers are the same whoever reads them, so one replica reads.

How: the pod's owner (epp/replica_members.py, the same rendezvous hashing as the KV shards)
scrapes it as one picker alone would and, after every round, good or failed, publishes what it
knows on the replica sync's channel `pod-metrics` (a SharedPage: the engine-neutral numbers,
their age, reachability, and how long the owner lets the pod rest when it is idle,
epp/scrape_pace.py), or how long it lets it be quiet when it is busy and nobody sends it
anything. The others apply it as if they had scraped (the numbers' age counts from the owner's
scrape). A pod resting at its owner is vouched for by the others until the owner's rest ends;
a replica that sends a resting or quiet pod a request (or holds requests in flow control)
tells the owner (channel `scrape-wake`, once per page), which scrapes it at once, as it would
for its own request. A replica from before the quiet pace sends no such wake for a quiet pod:
its requests there wait for the quiet interval, as another client's would.

Never worse than scraping alone: a replica scrapes a pod itself whenever it has no fresh
shared numbers for it — in the first second after start (before the owners are known), when
the owner died (until its heartbeat expires and the pod moves), when records are lost — and
stops when they flow again. It never publishes those fallback scrapes: only owners speak.
Records are checked like a page (finite, non-negative numbers, KV usage in 0..1, bounded
adapter lists) and a bad one is counted and dropped (epp/replica_sync.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from prometheus_client.core import CounterMetricFamily

from infergw.epp.datastore import Datastore, Endpoint, EndpointMetrics
from infergw.epp.engine_metrics import MAX_LORA_NAMES
from infergw.epp.replica_members import ReplicaMembers
from infergw.epp.replica_sync import ReplicaSync

PAGE_CHANNEL = "pod-metrics"
WAKE_CHANNEL = "scrape-wake"
MAX_NAME_CHARS = 256  # a LoRA adapter's name in a shared page
MAX_REST = 600.0  # seconds a shared page may be vouched for; longer is a bad record
MAX_FAILURES = 1_000_000


class SharedPage(msgspec.Struct, array_like=True, frozen=True):
    """What the owner knows of a pod after a round (EndpointMetrics, and what it made of it)."""

    waiting: float
    running: float
    kv_usage: float
    block_size: int | None
    num_blocks: int | None
    running_loras: list[str]
    waiting_loras: list[str]
    max_loras: int | None
    age: float  # seconds since the owner's last good page (inf: none yet)
    reachable: bool
    failures: int  # the owner's failed rounds in a row
    rest_for: float  # seconds the owner will not scrape an idle pod (0: it scrapes on)
    # Seconds the owner will not scrape a busy pod unless woken (0: it scrapes on). Last, with
    # a default: replicas from before it decode the pages and ignore it.
    quiet_for: float = 0.0


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SharedPage).decode


def page_of(ep: Endpoint, rest_for: float, now: float, quiet_for: float = 0.0) -> SharedPage:
    m = ep.metrics
    return SharedPage(
        waiting=m.waiting,
        running=m.running,
        kv_usage=m.kv_usage,
        block_size=m.block_size,
        num_blocks=m.num_blocks,
        running_loras=sorted(m.running_loras),
        waiting_loras=sorted(m.waiting_loras),
        max_loras=m.max_loras,
        age=now - m.updated_at if m.updated_at else math.inf,
        reachable=ep.reachable,
        failures=ep.scrape_failures,
        rest_for=rest_for,
        quiet_for=quiet_for,
    )


def read_page(data: bytes) -> SharedPage:
    """The payload as a SharedPage, or ValueError saying what is wrong with it."""
    try:
        page = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a shared page: {exc}") from None
    for name in ("waiting", "running"):
        _finite(name, getattr(page, name), math.inf)
    _finite("kv_usage", page.kv_usage, 1.0)
    _finite("rest_for", page.rest_for, MAX_REST)
    _finite("quiet_for", page.quiet_for, MAX_REST)
    if not (page.age >= 0):  # inf allowed (never scraped), NaN and negatives not
        raise ValueError(f"age = {page.age!r}")
    for name in ("block_size", "num_blocks", "max_loras"):
        value = getattr(page, name)
        if value is not None and not 0 <= value < 2**63:
            raise ValueError(f"{name} = {value!r}")
    if not 0 <= page.failures <= MAX_FAILURES:
        raise ValueError(f"failures = {page.failures!r}")
    for names in (page.running_loras, page.waiting_loras):
        if len(names) > MAX_LORA_NAMES or any(len(n) > MAX_NAME_CHARS for n in names):
            raise ValueError(f"adapter list of {len(names)} names, or a name too long")
    return page


def _finite(name: str, value: float, upper: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= upper):
        raise ValueError(f"{name} = {value!r} is not a number in 0..{upper}")


@dataclass(slots=True)
class _Heard:
    """The last shared page applied for a pod, as this replica saw it arrive."""

    at: float  # time.monotonic() it arrived
    vouched_until: float  # the owner rests the pod till then (0: it does not)
    quiet_until: float = 0.0  # the owner lets the busy pod be quiet till then (0: it does not)
    woke: bool = False  # this replica asked the owner to end that rest or quiet


class ScrapeShares:
    """One replica's side: whether to scrape a pod, publish what it scraped, apply the peers'."""

    def __init__(
        self,
        datastore: Datastore,
        sync: ReplicaSync,
        members: ReplicaMembers,
        *,
        stale_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datastore = datastore
        self.members = members
        self.stale_after = stale_after
        self._clock = clock
        self._heard: dict[Endpoint, _Heard] = {}
        self._publish_page = sync.data_channel(PAGE_CHANNEL, self._apply_page)
        self._publish_wake = sync.channel(WAKE_CHANNEL, self._apply_wake)
        self.on_applied: Callable[[], None] | None = None  # fresh numbers: notify waiters
        self.wake_owner_of: Callable[[Endpoint], None] | None = None  # set by the scraper
        self.fallback_rounds = 0  # scrapes of a pod this replica does not own

    def owns(self, ep: Endpoint) -> bool:
        return self.members.owns(ep.address)

    def scrapes(self, ep: Endpoint) -> bool:
        """Whether this replica scrapes `ep` this round: it owns it, or has nothing fresh."""
        if self.owns(ep):
            return True
        if self._fresh(ep):
            return False
        self.fallback_rounds += 1
        return True

    def _fresh(self, ep: Endpoint) -> bool:
        heard = self._heard.get(ep)
        if heard is None:
            return False
        now = self._clock()
        return now - heard.at <= self.stale_after or now < heard.vouched_until

    def publish(self, ep: Endpoint, rest_for: float, quiet_for: float = 0.0) -> None:
        """After a round this replica did as the pod's owner: tell the others."""
        if self.owns(ep):
            page = page_of(ep, rest_for, self._clock(), quiet_for)
            self._publish_page(ep.address, _encode(page))

    def _apply_page(self, address: str, data: bytes) -> None:
        page = read_page(data)
        ep = self.datastore.endpoint(address)
        if ep is None:  # the sync checked membership; the pool changed since
            return
        now = self._clock()
        if math.isfinite(page.age):
            ep.metrics = EndpointMetrics(
                waiting=page.waiting,
                running=page.running,
                kv_usage=page.kv_usage,
                block_size=page.block_size,
                num_blocks=page.num_blocks,
                running_loras=frozenset(page.running_loras),
                waiting_loras=frozenset(page.waiting_loras),
                max_loras=page.max_loras,
                updated_at=now - page.age,
            )
            # Like a scrape of our own: what we sent before it may be in its numbers.
            ep.sent_since_scrape = 0
        ep.reachable = page.reachable
        ep.scrape_failures = page.failures
        ep.stale = ep.metrics_age(now) > self.stale_after
        self._heard[ep] = _Heard(
            now,
            now + page.rest_for if page.rest_for else 0.0,
            now + page.quiet_for if page.quiet_for else 0.0,
        )
        if self.on_applied is not None:
            self.on_applied()

    def _apply_wake(self, address: str, _keys: list[int]) -> None:
        ep = self.datastore.endpoint(address)
        if ep is not None and self.wake_owner_of is not None and self.owns(ep):
            self.wake_owner_of(ep)

    def tick(self, ep: Endpoint, woken: bool, wakes_quiet: bool = False) -> bool:
        """Every manager tick, for a pod this replica does not scrape: vouch for a resting
        pod's numbers while nothing was sent to it (True: vouched), else ask its owner once
        to scrape it now. `woken`: ends a rest (scrape_pace.Pace.woken); `wakes_quiet`: ends
        a quiet wait (a request sent since the last page, or requests held for room)."""
        heard = self._heard.get(ep)
        if heard is None:
            return False
        now = self._clock()
        if wakes_quiet and now < heard.quiet_until:
            self._wake_owner(ep, heard)
            heard.quiet_until = 0.0
            return False
        if now >= heard.vouched_until:
            return False
        if not woken:
            return True
        self._wake_owner(ep, heard)
        # The owner's fresh page comes within a round: until stale_after from now, wait for
        # it rather than scrape; the numbers themselves are no longer vouched for.
        heard.vouched_until = 0.0
        heard.at = self._clock()
        return False

    def _wake_owner(self, ep: Endpoint, heard: _Heard) -> None:
        """Ask the owner to scrape the pod now, once per page heard."""
        if not heard.woke:
            heard.woke = True
            self._publish_wake(ep.address, [1])

    def forget(self, ep: Endpoint) -> None:
        self._heard.pop(ep, None)

    def collect(self):
        """Prometheus: rounds this replica scraped a pod it does not own (no fresh shared page)."""
        yield CounterMetricFamily(
            "infergate_epp_scrape_fallback_rounds",
            "Scrapes of a pod another replica owns, done because no fresh shared page for it "
            "arrived (just started, its owner gone, records lost); pages heard from owners are "
            "counted as applied in infergate_epp_replica_sync_records_total.",
            value=self.fallback_rounds,
        )
