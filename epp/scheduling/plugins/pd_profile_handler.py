"""pd-profile-handler: prefill/decode disaggregation, decode first (as llm-d schedules it).

1. The decode profile picks the decode pod, and its fallbacks.
2. Disaggregate only when the part of the prompt the decode pod does not hold is at least
   the threshold: `nonCachedTokens` (0: never), or with `decodeBatchWeight` /
   `prefillQueueWeight` that scaled by the two pods' load (pd_threshold.py has the formula).
   uncached = prompt tokens - cached blocks x block size on that pod. The precise prefix index
   answers when a precise-prefix-cache-scorer is configured and can tokenize the prompt, else
   the approximate prefix-cache-scorer, else nothing counts as cached. Only chat and
   completions requests are disaggregated.
3. The prefill profile picks prefill pods among the decode pod's P/D group: the endpoints
   whose group label (the request's ModelServer's workloadSelector.pdGroup.groupKey, else
   `groupLabel`) has the decode pod's value (both unlabelled also pairs), less the decode
   endpoint itself. With an adaptive threshold it runs when the prompt reaches the threshold
   for an idle prefill pod; the picked pod's queue then says whether to use it.
4. The decode pods stay the destination (fallbacks cut to the decode pod's group, so a retry
   pairs with the same prefill pods); the prefill pods, primary first, go to the decode pod's
   sidecar in x-prefiller-host-port. No prefill pod in the group: the decode pod serves the
   whole request (aggregated).

Each decision is kept in the request's context (the handler's slot there, `decision(ctx)`),
in the last `historySize` (GET /debug/pd) and in the picker's metrics (from the handle, when it
has them).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated

import msgspec

from infergw.api.names import GROUP_LABEL, PREFILLER_HEADER, ROLE_LABEL
from infergw.epp.context import PluginSlot, RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.errors import PickerError
from infergw.epp.scheduling.framework import Plugin, ProfileHandler, ProfileResult, SchedulingResult
from infergw.epp.scheduling.handle import Handle, PrefixSource
from infergw.epp.scheduling.params import (
    MAX_ENTRIES,
    MAX_TOKENS,
    Label,
    PluginParams,
    parse_params,
)
from infergw.epp.scheduling.plugins.pd_roles import roles_for
from infergw.epp.scheduling.plugins.pd_threshold import AdaptiveThreshold

if TYPE_CHECKING:
    from infergw.epp.metrics import PickerMetrics

DISAGGREGATED_APIS = frozenset({"chat", "completions"})

# Outcomes (the metric's label values) and the reasons behind them.
DISAGGREGATED = "disaggregated"
DECODE_ONLY = "decode_only"
NO_PREFILL_POD = "no_prefill_pod"
UNCACHED = "uncached"  # enough of the prompt is new to the decode pod: prefill elsewhere
CACHED = "cached"  # the decode pod holds enough of it
PREFILL_QUEUED = "prefill_queued"  # the picked prefill pod's queue raised the threshold above it
DISABLED = "disabled"  # nonCachedTokens is 0
API = "api"  # not a chat or completions request


@dataclass(slots=True)
class PDDecision:
    request_id: str
    model: str
    decode: str  # the decode endpoint's address
    group_key: str
    group: str | None  # the decode pod's value of group_key
    prompt_tokens: int
    cached_tokens: int
    source: str  # the plugin that said what the decode pod holds; "none"
    reason: str
    threshold: int = 0  # the uncached tokens at which this request would disaggregate
    outcome: str = ""
    prefill: list[str] = field(default_factory=list)
    at: float = 0.0

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def as_dict(self) -> dict:
        return {
            "time": self.at,
            "request_id": self.request_id,
            "model": self.model,
            "outcome": self.outcome,
            "reason": self.reason,
            "decode": self.decode,
            "prefill": self.prefill,
            "group": {"label": self.group_key, "value": self.group},
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "uncached_tokens": self.uncached_tokens,
            "threshold": self.threshold,
            "cache_source": self.source,
        }


Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Weight = Annotated[float, msgspec.Meta(ge=0, le=1e6)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]


class PDParams(PluginParams):
    non_cached_tokens: Tokens  # 0: never disaggregate
    # pd_threshold.py: 0 and 0 keep the threshold fixed
    decode_batch_weight: Weight = 0.0
    prefill_queue_weight: Weight = 0.0
    min_non_cached_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] = 1
    max_non_cached_tokens: Tokens = MAX_TOKENS
    # pd_threshold.py: a decode pod with more waiting gets no raise from the prefill queue
    decode_queue_limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_ENTRIES)] | None = None
    decode_profile: Name = "decode"
    prefill_profile: Name = "prefill"
    group_label: Label = GROUP_LABEL
    prefix_scorer: Name | None = None
    history_size: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 100


class PDProfileHandler(ProfileHandler):
    type_name = "pd-profile-handler"
    params_type = PDParams

    def __init__(
        self,
        name,
        params=None,
        *,
        plugins: Mapping[str, Plugin] = MappingProxyType({}),
        metrics: PickerMetrics | None = None,
    ):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.threshold = p.non_cached_tokens
        self.adaptive = AdaptiveThreshold(
            p.non_cached_tokens,
            p.decode_batch_weight,
            p.prefill_queue_weight,
            p.min_non_cached_tokens,
            p.max_non_cached_tokens,
            p.decode_queue_limit,
        )
        self.decode_profile = p.decode_profile
        self.prefill_profile = p.prefill_profile
        self.group_label = p.group_label
        self.prefix_name = p.prefix_scorer
        self.recent: deque[PDDecision] = deque(maxlen=p.history_size)
        self.counts: Counter[str] = Counter()  # outcome -> decisions
        self.sources: list[PrefixSource] = []  # asked in order what a pod holds of a prompt
        self._decision = PluginSlot[PDDecision](f"{name}.decision")
        self._plugins = plugins  # the config's, complete when configure() runs
        self._metrics = metrics  # decisions are counted there too

    @classmethod
    def create(cls, name, params, handle: Handle):
        return cls(name, params, plugins=handle.plugins, metrics=handle.metrics)

    def destinations(self, ctx, endpoints):
        # The destination is always the decode pod: a prefill-only pod's room is none for it.
        roles = roles_for(ctx, ROLE_LABEL)
        return [e for e in endpoints if roles.is_decode(e) or not roles.is_prefill(e)]

    def configure(self, profiles):
        plugins = self._plugins
        for key, profile in (
            ("decodeProfile", self.decode_profile),
            ("prefillProfile", self.prefill_profile),
        ):
            if profile not in profiles:
                raise ValueError(f"{key}: no schedulingProfile is named {profile!r}")
        if self.decode_profile == self.prefill_profile:
            raise ValueError("decodeProfile and prefillProfile must be different profiles")
        unused = sorted(set(profiles) - {self.decode_profile, self.prefill_profile})
        if unused:
            raise ValueError(f"runs only the decode and prefill profiles; {unused} would never run")
        if self.prefix_name is not None:
            plugin = plugins.get(self.prefix_name)
            if not isinstance(plugin, PrefixSource):
                raise ValueError(
                    f"prefixScorer {self.prefix_name!r} names no prefix-cache-scorer or "
                    "precise-prefix-cache-scorer"
                )
            self.sources = [plugin]
            return
        in_decode = {id(ws.scorer) for ws in profiles[self.decode_profile].scorers}
        found = [p for p in plugins.values() if isinstance(p, PrefixSource)]
        # The precise index knows what pods hold; the approximate scorer guesses. Among
        # equals, the one that scored the decode pods.
        found.sort(key=lambda p: (not p.precise, id(p) not in in_decode))
        self.sources = found

    # ---- the scheduling cycle ---------------------------------------------------------

    def pick_profiles(self, ctx, profiles, done):
        if self.decode_profile not in done:
            self._decision.clear(ctx)
            return [profiles[self.decode_profile]]
        if self.prefill_profile in done:
            return []
        decode = done[self.decode_profile]
        if decode is None or not decode.targets:
            return []
        decision = self._decide(ctx, decode.targets[0])
        self._decision.put(ctx, decision)
        return [profiles[self.prefill_profile]] if decision.reason == UNCACHED else []

    def decision(self, ctx: RequestContext) -> PDDecision | None:
        """This request's decision, once the decode pod is picked."""
        return self._decision.get(ctx)

    def profile_candidates(self, ctx, profile, candidates):
        if profile.name != self.prefill_profile:
            return candidates
        decision = self._decision.get(ctx)
        if decision is None:
            return []
        key, group, decode = decision.group_key, decision.group, decision.decode
        return [e for e in candidates if e.address != decode and e.labels.get(key) == group]

    def process_results(self, ctx, done):
        decode = done.get(self.decode_profile)
        if decode is None or not decode.targets:
            raise PickerError(429, "no decode endpoint left after filtering")
        decision = self._decision.get(ctx)
        assert decision is not None  # pick_profiles decided when the decode pod was picked
        prefill = done.get(self.prefill_profile)
        results = {self.decode_profile: decode}
        if decision.reason == UNCACHED and prefill is not None and prefill.targets:
            self._weigh_prefill_queue(decision, decode.targets[0], prefill.targets[0])
        if decision.reason != UNCACHED:
            decision.outcome = DECODE_ONLY
        elif prefill is None or not prefill.targets:
            decision.outcome = NO_PREFILL_POD
        else:
            decision.outcome = DISAGGREGATED
            decision.prefill = [e.address for e in prefill.targets]
            key, group = decision.group_key, decision.group
            kept = [e for e in decode.targets[1:] if e.labels.get(key) == group]
            if len(kept) + 1 != len(decode.targets):
                decode = ProfileResult([decode.targets[0], *kept], decode.scores)
            results = {self.decode_profile: decode, self.prefill_profile: prefill}
            # The prefill leg is a request on that pod: counted until its next scrape, as the
            # director counts the destination's, so the next decision sees the queue grow.
            prefill.targets[0].sent_since_scrape += 1
        if decision.prefill:
            ctx.upstream_headers[PREFILLER_HEADER] = ",".join(decision.prefill)
        else:
            ctx.upstream_headers.pop(PREFILLER_HEADER, None)
        self._record(decision)
        return SchedulingResult(results, self.decode_profile)

    # ---- helpers ----------------------------------------------------------------------

    def _decide(self, ctx: RequestContext, decode: Endpoint) -> PDDecision:
        key = self._group_key(ctx)
        decision = PDDecision(
            request_id=ctx.request_id,
            model=ctx.target_model,
            decode=decode.address,
            group_key=key,
            group=decode.labels.get(key),
            prompt_tokens=ctx.request.approx_prompt_tokens,
            cached_tokens=0,
            source="none",
            reason=DISABLED,
        )
        if self.threshold <= 0:
            return decision
        if ctx.api not in DISAGGREGATED_APIS:
            decision.reason = API
            return decision
        for plugin in self.sources:
            got = plugin.cached_prompt(ctx, decode.address)
            if got is not None:
                decision.prompt_tokens, decision.cached_tokens = got
                decision.source = plugin.name
                break
        decision.threshold = self.adaptive.lowest(decode)
        decision.reason = UNCACHED if decision.uncached_tokens >= decision.threshold else CACHED
        return decision

    def _weigh_prefill_queue(self, decision: PDDecision, decode: Endpoint, prefill: Endpoint):
        """With the prefill pod known, the threshold its queue gives (pd_threshold.py)."""
        decision.threshold = self.adaptive.tokens(decode, prefill)
        if decision.uncached_tokens < decision.threshold:
            decision.reason = PREFILL_QUEUED

    def _group_key(self, ctx: RequestContext) -> str:
        """The routed ModelServer's pdGroup.groupKey, else the configured label."""
        server = ctx.resolution.server if ctx.resolution is not None else None
        pd = server.spec.workload_selector.pd_group if server is not None else None
        return pd.group_key if pd is not None else self.group_label

    def _record(self, decision: PDDecision) -> None:
        decision.at = time.time()
        self.recent.append(decision)
        self.counts[decision.outcome] += 1
        m = self._metrics
        if m is None:
            return
        m.pd_decisions.labels(decision.outcome).inc()
        m.pd_picks.labels("decode", decision.decode).inc()
        if decision.prefill:
            m.pd_picks.labels("prefill", decision.prefill[0]).inc()
        if decision.reason in (UNCACHED, CACHED, PREFILL_QUEUED):
            m.pd_uncached_tokens.observe(decision.uncached_tokens)

    def debug(self) -> dict:
        """GET /debug/pd: the settings, totals and the last decisions, newest first."""
        return {
            "handler": self.name,
            "nonCachedTokens": self.threshold,
            "decodeBatchWeight": self.adaptive.decode_batch_weight,
            "prefillQueueWeight": self.adaptive.prefill_queue_weight,
            "minNonCachedTokens": self.adaptive.minimum,
            "maxNonCachedTokens": self.adaptive.maximum,
            "decodeQueueLimit": self.adaptive.decode_queue_limit,
            "decodeProfile": self.decode_profile,
            "prefillProfile": self.prefill_profile,
            "groupLabel": self.group_label,
            "cacheSources": [p.name for p in self.sources],
            "decisions_total": dict(self.counts),
            "recent": [d.as_dict() for d in reversed(self.recent)],
        }
