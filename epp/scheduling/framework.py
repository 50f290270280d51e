"""The plugin interfaces and the scheduler that runs them.

A plugin is one small class with a `type_name`; it may implement several interfaces (a
prefix scorer is also a PreRequest that remembers where a prompt went). A profile runs its
filters in order, sums clamp(score, 0, 1) × weight over its scorers, and lets its picker
order the survivors. A ProfileHandler decides which profiles run, on which candidates, and
which one's result is the answer (prefill/decode runs a decode profile, then maybe a prefill
profile on the decode pod's group).

Plugins get the request's context (epp.context.RequestContext): the parsed request, never
changed, as `ctx.request`; what the picker decided so far (the engine's model, the route)
beside it; and typed slots for what a plugin keeps per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from infergw.api import tracing
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.errors import PickerError
from infergw.epp.metric_values import LocalTally

if TYPE_CHECKING:
    from infergw.epp.scheduling.handle import Handle


class Plugin:
    type_name: ClassVar[str] = ""
    # The picker builds the KV cache (sockets, tokenizers, the index) only when a plugin type
    # the config names says so, before it builds the plugins that take it from the handle.
    needs_kv_cache: ClassVar[bool] = False

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        self.name = name
        self.params = params or {}

    @classmethod
    def create(cls, name: str, params: dict[str, Any] | None, handle: Handle) -> Self:
        """The factory the registry calls. A plugin that needs part of the handle overrides
        it and passes that part to its constructor."""
        return cls(name, params)


class Filter(Plugin):
    def filter(self, ctx: RequestContext, endpoints: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    def score(self, ctx: RequestContext, endpoints: list[Endpoint]) -> list[float]:
        """One score per endpoint, in order; 0 is worst, 1 is best."""
        raise NotImplementedError


class Picker(Plugin):
    def pick(
        self, ctx: RequestContext, scored: list[tuple[Endpoint, float]], count: int
    ) -> list[Endpoint]:
        """Up to `count` endpoints, best first."""
        raise NotImplementedError


@dataclass(slots=True)
class ResponseInfo:
    """What the picker saw of the answer, for PostResponse plugins."""

    endpoint: Endpoint | None
    status: int | None  # None: the proxy sent no response headers (0: cancelled)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft: float | None = None
    tpot: float | None = None
    response_bytes: int = 0  # the answer's body as the engine sent it
    # Time to first token as the client sees it: from the request's arrival at the picker
    # (parsing, flow control's wait and scheduling included); `ttft` is the pod's part.
    client_ttft: float | None = None
    # A streamed answer's gaps between body chunks (None: not streamed, or not seen).
    chunk_gaps: LocalTally | None = None


class PreRequest(Plugin):
    def pre_request(self, ctx: RequestContext, result: SchedulingResult) -> None:
        raise NotImplementedError


class PrepareData(Plugin):
    """Work for a request before scheduling that may be heavy (tokenizing its prompt): awaited,
    so it can run off the event loop, and kept in the request's context for the scoring that
    follows."""

    async def prepare(self, ctx: RequestContext) -> None:
        raise NotImplementedError


class PostResponse(Plugin):
    def post_response(self, ctx: RequestContext, info: ResponseInfo) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class Profile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None


@dataclass(slots=True)
class ProfileResult:
    targets: list[Endpoint]
    scores: dict[str, float] = field(default_factory=dict)  # by address, for debugging


@dataclass(slots=True)
class SchedulingResult:
    results: dict[str, ProfileResult]
    primary: str

    @property
    def targets(self) -> list[Endpoint]:
        return self.results[self.primary].targets


class ProfileHandler(Plugin):
    def configure(self, profiles: dict[str, Profile]) -> None:
        """Once, after the config is built: look up the profiles it works with (and, through
        the handle it was made with, other plugins). Raise ValueError for a config it cannot
        work with."""

    def profile_candidates(
        self, ctx: RequestContext, profile: Profile, candidates: list[Endpoint]
    ) -> list[Endpoint]:
        """The candidates `profile` runs on. The scheduler calls this only for handlers that
        override it; empty makes the profile's result None."""
        return candidates

    def destinations(self, ctx: RequestContext, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Those of `endpoints` the request's destination can be (flow control asks whether
        they have room): all of them, unless the handler sends requests to some only."""
        return endpoints

    def pick_profiles(
        self,
        ctx: RequestContext,
        profiles: dict[str, Profile],
        done: dict[str, ProfileResult | None],
    ) -> list[Profile]:
        """The profiles to run next; empty when scheduling is complete."""
        raise NotImplementedError

    def process_results(
        self, ctx: RequestContext, done: dict[str, ProfileResult | None]
    ) -> SchedulingResult:
        raise NotImplementedError


# extension point, plugin type, plugin name, seconds
DurationSink = Callable[[str, str, str, float], None]


class Scheduler:
    def __init__(
        self,
        profiles: dict[str, Profile],
        handler: ProfileHandler,
        max_endpoints: int,
        observe: DurationSink | None = None,
    ) -> None:
        self.profiles = profiles
        self.handler = handler
        self.max_endpoints = max_endpoints
        self._observe = observe or (lambda *_: None)
        # Only handlers that narrow candidates per profile pay for the call.
        self._narrows = type(handler).profile_candidates is not ProfileHandler.profile_candidates

    def schedule(self, ctx: RequestContext, candidates: list[Endpoint]) -> SchedulingResult:
        if not candidates:
            raise PickerError(503, "no endpoints available for the request")
        done: dict[str, ProfileResult | None] = {}
        while True:
            todo = self.handler.pick_profiles(ctx, self.profiles, done)
            if not todo:
                break
            for profile in todo:
                endpoints = candidates
                if self._narrows:
                    endpoints = self.handler.profile_candidates(ctx, profile, candidates)
                    if not endpoints:
                        done[profile.name] = None
                        continue
                with tracing.span("gateway.profile", {"infergate.profile": profile.name}):
                    done[profile.name] = self._run_profile(profile, ctx, endpoints)
        return self.handler.process_results(ctx, done)

    def _run_profile(
        self, profile: Profile, ctx: RequestContext, candidates: list[Endpoint]
    ) -> ProfileResult | None:
        traced = tracing.recording()  # a span per plugin only for a sampled request
        endpoints = candidates
        for f in profile.filters:
            t0 = time.perf_counter()
            with _plugin_span(traced, "Filter", f, len(endpoints)):
                endpoints = f.filter(ctx, endpoints)
            self._observe("Filter", f.type_name, f.name, time.perf_counter() - t0)
            if not endpoints:
                return None
        totals = [0.0] * len(endpoints)
        for ws in profile.scorers:
            t0 = time.perf_counter()
            with _plugin_span(traced, "Scorer", ws.scorer, len(endpoints)):
                scores = ws.scorer.score(ctx, endpoints)
            self._observe("Scorer", ws.scorer.type_name, ws.scorer.name, time.perf_counter() - t0)
            for i, s in enumerate(scores):
                totals[i] += min(1.0, max(0.0, s)) * ws.weight
        scored = list(zip(endpoints, totals, strict=True))
        assert profile.picker is not None
        t0 = time.perf_counter()
        with _plugin_span(traced, "Picker", profile.picker, len(scored)):
            targets = profile.picker.pick(ctx, scored, self.max_endpoints)
        self._observe(
            "Picker", profile.picker.type_name, profile.picker.name, time.perf_counter() - t0
        )
        return ProfileResult(targets, {e.address: s for e, s in scored})


_UNTRACED = nullcontext()


def _plugin_span(
    traced: bool, point: str, plugin: Plugin, endpoints: int
) -> AbstractContextManager:
    if not traced:
        return _UNTRACED
    return tracing.span(
        "gateway.plugin",
        {
            "infergate.extension_point": point,
            "infergate.plugin.type": plugin.type_name,
            "infergate.plugin.name": plugin.name,
            "infergate.endpoints": endpoints,
        },
    )
