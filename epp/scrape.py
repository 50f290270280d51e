"""Scrape every endpoint's /metrics concurrently, each on its own interval loop.

A pod that fails `unreachable_after` scrapes in a row leaves the candidate set until it
answers again; metrics older than `stale_after` mark an endpoint stale, which scorers treat
as saturated.

A pod's answers are untrusted input: redirects are not followed (the numbers must be the
pod's own, not those of whatever address it names: an idle pod's, an internal service's),
bodies are read up to a cap (epp/scrape_fetch.py) and decoded as UTF-8 (the Prometheus text
format and JSON both are; a declared charset is ignored, as some name bytes-to-bytes codecs
such as `hex`), and whatever goes wrong in one round is counted by reason, logged, and retried
on the next: a loop never ends but by the pod leaving the pool.

The cost follows what routing needs: pages are fetched on a thread of their own whose CPU is
counted (scrape_fetch), only the lines of the few metrics used are looked at
(engine_metrics.sample_lines), a page whose lines are those of the last one is not parsed
again, and a pod the picker sends nothing is scraped seldom — a busy one at the quiet pace,
an idle one resting — while the picker's own counts stand for it (scrape_pace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import aiohttp
import msgspec
from prometheus_client.core import CounterMetricFamily

from infergw.api.engines import metrics_path
from infergw.epp.datastore import Datastore, Endpoint, EndpointMetrics
from infergw.epp.engine_metrics import (
    InvalidMetricValue,
    MetricsParseError,
    Vocabulary,
    parse_lines,
    sample_lines,
    vocabulary,
)
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scrape_fetch import PageFetcher, ScrapeError
from infergw.epp.scrape_pace import (
    DEFAULT_IDLE_INTERVAL,
    DEFAULT_QUIET_INTERVAL,
    FAST,
    QUIET,
    RESTING,
    Pace,
)
from infergw.epp.scrape_shares import ScrapeShares

log = logging.getLogger("epp.scrape")

# A vLLM page with many LoRA adapters and histograms is a few hundred KiB.
MAX_METRICS_BYTES = 4 * 1024 * 1024
# Pages are parsed on the event loop every request shares, and a page at the cap costs up to
# a second of CPU: a pod's next scrape waits at least this many times the CPU its last page
# took, so that no pod (hostile or just verbose) spends more than 1/PARSE_BACKOFF of the loop.
# A real page costs a millisecond or less: its pod keeps the configured interval.
PARSE_BACKOFF = 20
MAX_MODELS_BYTES = 1024 * 1024
# Models one pod may list (base models and LoRA adapters); a longer list is refused whole.
MAX_MODELS_PER_ENDPOINT = 4096
# The wanted lines of a pod's last page are kept to recognize the next one when it is the
# same; a page with more than this (a pathological number of engines or adapters) is not.
MAX_REMEMBERED_CHARS = 16 * 1024

# Reasons of infergate_epp_metrics_scrape_errors_total (a fixed set: label values stay few).
UNREACHABLE = "unreachable"  # connection refused or reset, timeout
HTTP_STATUS = "http_status"
# TOO_LARGE: scrape_fetch's, raised where the body is read.
NOT_UTF8 = "not_utf8"
PARSE = "parse"
INVALID_VALUE = "invalid_value"
TOO_MANY = "too_many"  # /v1/models lists more than MAX_MODELS_PER_ENDPOINT
INTERNAL = "internal"  # a bug of ours, seen on a pod's answer: logged with its traceback


class ModelCard(msgspec.Struct):
    """One entry of an OpenAI-style /v1/models answer; other fields are skipped."""

    id: str
    parent: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]


_MODELS = msgspec.json.Decoder(ModelList)


@dataclass(slots=True)
class _Page:
    """The wanted lines of a pod's last good page and what they said."""

    vocab: Vocabulary
    lines: tuple[str, ...]
    metrics: EndpointMetrics


@dataclass(slots=True, eq=False)
class _PodState:
    last: _Page | None = None
    waiting: str | None = None  # QUIET or RESTING while its loop waits at that pace
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _classify(exc: BaseException) -> str:
    if isinstance(exc, ScrapeError):
        return exc.reason
    if isinstance(exc, TimeoutError | aiohttp.ClientError | OSError):
        return UNREACHABLE
    if isinstance(exc, InvalidMetricValue):
        return INVALID_VALUE
    if isinstance(exc, MetricsParseError):
        return PARSE
    return INTERNAL


class MetricsScraper:
    def __init__(
        self,
        datastore: Datastore,
        metrics: PickerMetrics,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        stale_after: float | None = None,
        unreachable_after: int = 3,
        models_interval: float = 5.0,
        idle_interval: float = DEFAULT_IDLE_INTERVAL,
        quiet_interval: float = DEFAULT_QUIET_INTERVAL,
        stale_bound: float | None = None,
    ) -> None:
        """`stale_bound`: the shortest staleness other readers of the numbers apply (flow
        control's), which the quiet pace must stay under as well as `stale_after`."""
        self.datastore = datastore
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        # Fresh enough: a few missed scrapes, never less than 200 ms.
        self.stale_after = stale_after if stale_after is not None else max(0.2, 5 * interval)
        self.unreachable_after = unreachable_after
        self.models_interval = models_interval
        bound = min(self.stale_after, stale_bound if stale_bound is not None else math.inf)
        self.pace = Pace.of(interval, idle_interval, quiet_interval, bound)
        self.on_refresh: Callable[[], None] | None = None  # called after every good scrape
        # Requests wait in flow control for room: every page may release them, so no pod
        # waits at the quiet pace meanwhile.
        self.held: Callable[[], bool] = lambda: False
        self._loops: dict[Endpoint, asyncio.Task] = {}
        self._pods: dict[Endpoint, _PodState] = {}
        self.fetcher = PageFetcher(timeout)
        # CPU seconds the main loop spent on scraping: reading the pages, acting on them,
        # the manager's ticks (the loop's own switching between tasks is not counted).
        self.loop_cpu = 0.0
        self._task: asyncio.Task | None = None
        # Several replicas: scrape only the pods this one owns, hear the rest (share()).
        self.shares: ScrapeShares | None = None

    def share(self, shares: ScrapeShares) -> None:
        """Scrape with the other picker replicas (epp/scrape_shares.py)."""
        self.shares = shares
        shares.on_applied = self.on_refresh
        shares.wake_owner_of = self._wake

    def _wake(self, ep: Endpoint) -> None:
        state = self._pods.get(ep)
        if state is not None and state.waiting is not None:
            state.wake.set()

    async def start(self) -> None:
        self.fetcher.start()
        self._task = asyncio.create_task(self._manage(), name="scrape-manager")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._loops.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        self._pods.clear()
        self.fetcher.stop()

    def cpu_seconds(self) -> float:
        """CPU scraping has cost this process: fetching pages (their thread) and reading
        them (the main loop)."""
        return self.fetcher.cpu_seconds() + self.loop_cpu

    def _charge(self, start: float) -> float:
        """Count the main loop's CPU since `start` (time.thread_time()) as scraping's."""
        spent = time.thread_time() - start
        self.loop_cpu += spent
        return spent

    def collect(self):
        """Prometheus: scraping's CPU apart from the requests' (bench/routing reads it)."""
        family = CounterMetricFamily(
            "infergate_epp_scrape_cpu_seconds",
            "CPU seconds this picker spent scraping model servers: 'fetch' is the thread "
            "that fetches the pages (HTTP), 'loop' the main loop reading them and acting "
            "on them.",
            labels=["part"],
        )
        family.add_metric(["fetch"], self.fetcher.cpu_seconds())
        family.add_metric(["loop"], self.loop_cpu)
        yield family

    async def _manage(self) -> None:
        """Keep one loop per endpoint and refresh staleness between scrapes. Loops are kept
        by Endpoint object, not address: a new pod on a recycled IP is a new endpoint."""
        while True:
            start = time.thread_time()
            try:
                self._sync_loops()
            except Exception:  # a bug here must not stop every endpoint's refresh
                log.exception("scrape manager: refreshing the endpoint loops failed")
            self._charge(start)
            await asyncio.sleep(self.interval)

    def _sync_loops(self) -> None:
        current = self.datastore.endpoints()
        alive = set(current)
        for ep in list(self._loops):
            if ep not in alive:
                self._loops.pop(ep).cancel()
                self._pods.pop(ep, None)
                if self.shares is not None:
                    self.shares.forget(ep)
        for ep in current:
            if ep not in self._loops:
                self._loops[ep] = asyncio.create_task(self._loop(ep), name=f"scrape {ep.address}")
        now = time.monotonic()
        held = self.held()
        for ep in current:
            state = self._pods.get(ep)
            if state is not None and state.waiting is not None:
                if self.pace.wakes(state.waiting, ep) or (held and state.waiting == QUIET):
                    state.wake.set()  # a request went there (or waits for room): scrape it now
                elif state.waiting == RESTING:
                    # Nothing was sent since its last page said it was idle: still true.
                    ep.metrics.updated_at = now
            elif self.shares is not None and self.shares.tick(
                ep, self.pace.woken(ep), held or self.pace.wakes(QUIET, ep)
            ):
                ep.metrics.updated_at = now  # its owner rests it, and nothing went there
            ep.stale = ep.metrics_age(now) > self.stale_after

    def resting(self, ep: Endpoint) -> bool:
        """Whether the pod waits out the idle interval (scrape_pace) right now."""
        return self.waiting(ep) == RESTING

    def waiting(self, ep: Endpoint) -> str | None:
        """QUIET or RESTING while the pod's loop waits at that pace (scrape_pace), else None."""
        state = self._pods.get(ep)
        return state.waiting if state is not None else None

    def _state(self, ep: Endpoint) -> _PodState:
        state = self._pods.get(ep)
        if state is None:
            state = self._pods[ep] = _PodState()
        return state

    async def _loop(self, ep: Endpoint) -> None:
        state = self._state(ep)
        next_models = 0.0  # served models change rarely (LoRA loads): ask now and then
        slowed = False
        while True:
            t0 = time.monotonic()
            parse_cpu = 0.0
            scraped = self.shares is None or self.shares.scrapes(ep)
            try:
                if scraped:
                    parse_cpu = await self.scrape_once(ep)
                # A pod that is still starting is asked again on the next round, not only
                # after models_interval: its adapters decide where LoRA prompts go.
                if t0 >= next_models and ep.reachable and await self.fetch_models(ep):
                    next_models = t0 + self.models_interval
            except Exception as exc:  # the loop outlives any one round
                self._failed(ep, exc)
            wait = max(0.0, self.interval - (time.monotonic() - t0))
            # Slowed only for pages that cost more than the interval allows: a slow answer
            # (a loaded machine) leaves no wait, and is not the page's CPU.
            slow = parse_cpu * PARSE_BACKOFF > self.interval
            if slow:
                wait = max(wait, parse_cpu * PARSE_BACKOFF)
                if not slowed:
                    log.warning(
                        "endpoint %s: its /metrics page took %.0f ms of CPU to read; "
                        "scraping it every %.1fs while its pages cost that much",
                        ep.address,
                        parse_cpu * 1000,
                        wait,
                    )
            slowed = slow
            pace = self._pace(ep, scraped, next_models)
            if scraped and self.shares is not None:
                rest = self.pace.wait_for(pace)
                self.shares.publish(
                    ep, rest if pace == RESTING else 0.0, rest if pace == QUIET else 0.0
                )
            if pace != FAST:
                await self._rest(state, pace, t0)
                wait = t0 + wait - time.monotonic()  # woken early: still no sooner than that
            if wait > 0:
                await asyncio.sleep(wait)

    def _pace(self, ep: Endpoint, scraped: bool, next_models: float) -> str:
        """The pace of the wait after this round (scrape_pace). Only a round that scraped
        the pod, once its models are known (a pod still starting is asked again soon), may
        slow down. With shares only the owner slows a pod down (the others wake it, through
        the shares, when they send it requests): a replica scraping for itself until shared
        pages flow keeps the fast interval, so it notices them at once."""
        if not scraped or next_models <= time.monotonic():
            return FAST
        if self.shares is not None and not self.shares.owns(ep):
            return FAST
        pace = self.pace.pace(ep)
        return FAST if pace == QUIET and self.held() else pace

    async def _rest(self, state: _PodState, pace: str, since: float) -> None:
        """Wait at `pace` from the round that began at `since` (the next page of a quiet pod
        must come before its numbers go stale), or until the manager sees something that
        ends the wait (scrape_pace)."""
        state.wake.clear()
        state.waiting = pace
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(since + self.pace.wait_for(pace) - time.monotonic()):
                    await state.wake.wait()
        finally:
            state.waiting = None

    async def fetch_models(self, ep: Endpoint) -> bool:
        """GET /v1/models; a server without it (or a bad answer) leaves the list as it was.
        False only when the pod could not be reached, so that it is asked again soon."""
        try:
            status, body = await self.fetcher.get(
                f"http://{ep.address}/v1/models", MAX_MODELS_BYTES
            )
            if status != 200:
                return True
            models = _MODELS.decode(body)
            if len(models.data) > MAX_MODELS_PER_ENDPOINT:
                raise ScrapeError(
                    TOO_MANY, f"{len(models.data)} models > {MAX_MODELS_PER_ENDPOINT}"
                )
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        except (ScrapeError, msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            # Not an answer we can use (too large, not JSON, nested without end): the pod
            # serves; only its model list stays as it was.
            self._models_failed(ep, PARSE if not isinstance(exc, ScrapeError) else exc.reason)
            return True
        except Exception:
            log.exception("endpoint %s: reading /v1/models failed", ep.address)
            self._models_failed(ep, INTERNAL)
            return True
        ep.models = frozenset(m.id for m in models.data)
        ep.lora_parents = {m.id: m.parent for m in models.data if m.parent is not None}
        if ep.models_problem is not None:
            log.info("endpoint %s: its /v1/models answer is usable again", ep.address)
            ep.models_problem = None
        return True

    def _models_failed(self, ep: Endpoint, reason: str) -> None:
        # Counted every time; logged when a run of bad answers starts or changes reason (a
        # pod answering nonsense was a warning every models_interval, for ever).
        self.metrics.scrape_errors.labels(ep.address, f"models_{reason}").inc()
        if ep.models_problem != reason:
            ep.models_problem = reason
            log.warning(
                "endpoint %s: unusable /v1/models answer (%s); its model list stays as it was "
                '(counted in infergate_epp_metrics_scrape_errors_total{reason="models_%s"}, '
                "logged again only when the reason changes)",
                ep.address,
                reason,
                reason,
            )

    async def scrape_once(self, ep: Endpoint) -> float:
        """One round: fetch and parse the engine's Prometheus page (/metrics, or where its
        engine serves it); any failure is counted, never raised. Returns the CPU seconds
        reading the page took on the event loop."""
        url = f"http://{ep.address}{metrics_path(ep.engine)}"
        # Requests sent while this scrape is under way may be missing from its numbers.
        sent_before = ep.sent_since_scrape
        self.metrics.scrapes.inc()
        try:
            status, body = await self.fetcher.get(url, MAX_METRICS_BYTES)
        except Exception as exc:  # unreachable, too large: counted
            start = time.thread_time()
            self._failed(ep, exc)
            self._charge(start)
            return 0.0
        start = time.thread_time()  # no await from here to the end
        try:
            if status != 200:
                raise ScrapeError(HTTP_STATUS, f"HTTP {status}")
            try:
                text = body.decode()
            except UnicodeDecodeError as exc:
                raise ScrapeError(NOT_UTF8, f"not UTF-8: {exc}") from None
            ep.metrics = self._read(ep, text)
        except Exception as exc:  # every failure of one round is counted
            self._failed(ep, exc)
            return self._charge(start)
        parse_cpu = time.thread_time() - start
        if not ep.reachable:
            log.info("endpoint %s answers again", ep.address)
        ep.reachable = True
        ep.scrape_failures = 0
        ep.stale = False
        ep.sent_since_scrape = max(0, ep.sent_since_scrape - sent_before)
        if self.on_refresh is not None:
            try:
                self.on_refresh()
            except Exception:
                log.exception("after scraping %s: on_refresh failed", ep.address)
        self._charge(start)
        return parse_cpu

    def _read(self, ep: Endpoint, text: str) -> EndpointMetrics:
        """The page's metrics; when its wanted lines are the last page's, those metrics again
        (fresh), without parsing: an idle or steady pod's page differs only elsewhere."""
        vocab = vocabulary(ep.engine)
        lines = sample_lines(text, vocab.wanted)
        state = self._state(ep)
        last = state.last
        if last is not None and last.vocab is vocab and last.lines == lines:
            return replace(last.metrics, updated_at=time.monotonic())
        metrics = parse_lines(lines, vocab)
        small = sum(map(len, lines)) <= MAX_REMEMBERED_CHARS
        state.last = _Page(vocab, lines, metrics) if small else None
        return metrics

    def _failed(self, ep: Endpoint, exc: Exception) -> None:
        ep.scrape_failures += 1
        reason = _classify(exc)
        self.metrics.scrape_errors.labels(ep.address, reason).inc()
        self.metrics.poll_errors.inc()
        if reason == INTERNAL:
            log.error("endpoint %s: scrape failed", ep.address, exc_info=exc)
        elif ep.scrape_failures == 1 and reason != UNREACHABLE:
            log.warning("endpoint %s: bad /metrics answer (%s): %s", ep.address, reason, exc)
        if ep.scrape_failures == self.unreachable_after:
            log.warning(
                "endpoint %s unreachable after %d failed scrapes (%s: %s); dropped "
                "until it answers",
                ep.address,
                ep.scrape_failures,
                reason,
                exc,
            )
        if ep.scrape_failures >= self.unreachable_after:
            ep.reachable = False
        ep.stale = ep.metrics_age() > self.stale_after
