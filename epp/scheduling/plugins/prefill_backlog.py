"""prefill-backlog-scorer: when a new prompt's prefill would be done on each pod.

Prefill is what a new request waits for: a pod still prefilling a prompt sent 10 ms ago makes
it wait ~a whole prefill, one whose requests are all decoding makes it wait a decode step.
In-flight counts and scraped metrics cannot tell the two apart (a count is a count; a scrape
is up to an interval old), so on traffic with no reuse the load scorers lost to round robin
past ~2 requests a second a pod (tests/epp/scheduling/test_load_balance.py replays it).

The scorer keeps, for each pod, when the prefills the picker sent it should be done: a
request sent at `now` is done at max(now, done) + its prompt tokens × the seconds a token,
and a pod scores lower the longer a prompt sent now would wait. By default every prompt token
is charged, cached or not: affinity is the prefix scorers' to weigh, and in the replays
(tests/epp/scheduling) charging only what a pod does not hold was 10–25 % worse on shared
prefixes. `chargeCachedTokens: false` charges the share the prefix scorer saw the pod did not
hold when it scored the request (before this request's own entries there): a pod holding a
popular prefix then does not look a whole prefill behind for every hit it took. Through the
stack neither way kept a shared-prefix fleet's hit rate, and with every token charged the fleet
fell behind at two of three rates, so bench routing's prefix profiles go without the scorer.

The seconds a token are one figure for the pool (its pods serve one model, as a rule on one
kind of accelerator; learnt per pod, the noise between pods' figures drew requests to the pod
that looked fastest): learnt from the answers of requests sent when their pod had no prefill
of ours ahead of them (TTFT over uncached prompt tokens, a moving average), or set
(`secondsPerToken`). Until the first answer every pod counts as free: the other scorers decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated

import msgspec

from infergw.epp.context import PluginSlot
from infergw.epp.scheduling.framework import PostResponse, PreRequest, Scorer
from infergw.epp.scheduling.handle import Handle, HeldShare
from infergw.epp.scheduling.params import PluginParams, parse_params

# Below this many uncached tokens a TTFT is mostly the engine's fixed cost, not prefill.
MIN_LEARN_TOKENS = 64
# Weight of the newest answer in the seconds a token (a moving average).
LEARN_WEIGHT = 0.2


class PrefillBacklogParams(PluginParams):
    # Seconds of prefill a prompt token costs; None: learnt from the pods' answers.
    seconds_per_token: Annotated[float, msgspec.Meta(gt=0, le=1.0)] | None = None
    # Charge a pod every prompt token sent to it (true), or only those a prefix scorer in
    # the config saw it did not hold when it scored the request (false).
    charge_cached_tokens: bool = True


@dataclass(frozen=True, slots=True)
class _Sent:
    address: str
    alone: bool  # no prefill of ours was ahead of it: its TTFT is its own prefill


class PrefillBacklogScorer(Scorer, PreRequest, PostResponse):
    type_name = "prefill-backlog-scorer"
    params_type = PrefillBacklogParams

    def __init__(
        self,
        name,
        params=None,
        clock: Callable[[], float] = time.monotonic,
        plugins: Mapping[str, object] | None = None,
    ):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        # Seconds a prompt token: set, or learnt (None until the first answer).
        self.per_token = p.seconds_per_token
        self.charge_cached = p.charge_cached_tokens
        # The config's plugins (filled as it builds them): where the held shares come from.
        self._plugins = plugins or {}
        self._sources: list[HeldShare] | None = None
        self.learns = self.per_token is None
        self.clock = clock
        # When the prefills sent so far to each pod should be over (monotonic seconds).
        self._done_at: dict[str, float] = {}
        self._sent: PluginSlot[_Sent] = PluginSlot(f"{name}.sent")

    @classmethod
    def create(cls, name, params, handle: Handle):
        return cls(name, params, plugins=handle.plugins)

    def _held_share(self, ctx, address: str) -> float:
        """The share of the prompt `address` held when scored, by the first prefix scorer
        that scored it (precise before approximate); 0 when none did."""
        if self._sources is None:  # the config is complete by the first request
            found = [p for p in self._plugins.values() if isinstance(p, HeldShare)]
            self._sources = sorted(found, key=lambda p: not p.precise)
        for source in self._sources:
            share = source.held_share(ctx, address)
            if share is not None:
                return share
        return 0.0

    def forget_server(self, address: str) -> None:
        self._done_at.pop(address, None)

    def wait(self, address: str, now: float) -> float:
        """Seconds of our prefills still ahead of a prompt sent to `address` now."""
        return max(0.0, self._done_at.get(address, 0.0) - now)

    def score(self, ctx, endpoints):
        now = self.clock()
        waits = [self.wait(e.address, now) for e in endpoints]
        # Waits are weighed against the prompt's own prefill, not spread over 0..1: a pod
        # 5 ms from done must not lose a full weight to an idle one (it pushed prompts off
        # the pods holding their prefix), one a whole prefill behind must.
        own = ctx.request.approx_prompt_tokens * (self.per_token or 0.0)
        scale = max(max(waits), own)
        return [1.0 - w / scale if scale > 0 else 1.0 for w in waits]

    def pre_request(self, ctx, result):
        if not result.targets:
            return
        address, now = result.targets[0].address, self.clock()
        done_at = self._done_at.get(address, 0.0)
        if self.per_token is not None:
            tokens = ctx.request.approx_prompt_tokens
            if not self.charge_cached:
                tokens *= 1.0 - self._held_share(ctx, address)
            self._done_at[address] = max(now, done_at) + tokens * self.per_token
        self._sent.put(ctx, _Sent(address, alone=done_at <= now))

    def post_response(self, ctx, info):
        sent = self._sent.get(ctx)
        if sent is None or not sent.alone or not self.learns:
            return
        if info.ttft is None or info.prompt_tokens is None or not 200 <= (info.status or 0) < 400:
            return
        uncached = info.prompt_tokens - (info.cached_tokens or 0)
        if uncached < MIN_LEARN_TOKENS:
            return
        sample, old = info.ttft / uncached, self.per_token
        self.per_token = sample if old is None else old + LEARN_WEIGHT * (sample - old)
