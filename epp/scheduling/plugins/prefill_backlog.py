"""prefill-backlog-scorer: how long a new prompt would wait behind the prefills the picker sent.

Prefill is what a new request waits for: a pod still prefilling a prompt sent 10 ms ago makes
it wait ~a whole prefill, one whose requests are all decoding makes it wait a decode step.
In-flight counts and scraped metrics cannot tell the two apart (a count is a count; a scrape
is up to an interval old), so on traffic with no reuse the load scorers lost to round robin
past ~2 requests a second a pod (tests/epp/scheduling/test_load_balance.py replays it).

The scorer keeps, for each pod, when the prefills the picker sent it should be done: a
request sent at `now` is done at max(now, done) + its prompt tokens × the pod's seconds a
token. The seconds a token are learnt from the answers of requests sent when the pod had no
prefill ahead of them (TTFT over uncached prompt tokens, a moving average), or set
(`secondsPerToken`). Until a pod has taught one, its backlog counts as none: the scorer
ranks it with the empty ones and the other scorers decide. Lower wait scores higher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import msgspec

from infergw.epp.context import PluginSlot
from infergw.epp.scheduling.framework import PostResponse, PreRequest, Scorer
from infergw.epp.scheduling.params import PluginParams, parse_params
from infergw.epp.scheduling.plugins._normalize import lower_is_better

# Below this many uncached tokens a TTFT is mostly the engine's fixed cost, not prefill.
MIN_LEARN_TOKENS = 64
# Weight of the newest answer in a pod's seconds a token (a moving average).
LEARN_WEIGHT = 0.2
# Pods remembered at most: past it, those with nothing of ours left to prefill are forgotten.
MAX_PODS = 10_000


class PrefillBacklogParams(PluginParams):
    # Seconds of prefill a prompt token costs; None: learnt per pod from its answers.
    seconds_per_token: Annotated[float, msgspec.Meta(gt=0, le=1.0)] | None = None


@dataclass(slots=True)
class _Pod:
    done_at: float = 0.0  # when the prefills sent so far should be over (monotonic seconds)
    per_token: float | None = None  # seconds a prompt token; None: not learnt yet


@dataclass(frozen=True, slots=True)
class _Sent:
    address: str
    alone: bool  # no prefill of ours was ahead of it: its TTFT is its own prefill


class PrefillBacklogScorer(Scorer, PreRequest, PostResponse):
    type_name = "prefill-backlog-scorer"
    params_type = PrefillBacklogParams

    def __init__(self, name, params=None, clock: Callable[[], float] = time.monotonic):
        super().__init__(name, params)
        self.fixed = parse_params(self.params_type, self.params).seconds_per_token
        self.clock = clock
        self._pods: dict[str, _Pod] = {}
        self._sent: PluginSlot[_Sent] = PluginSlot(f"{name}.sent")

    def wait(self, address: str, now: float) -> float:
        """Seconds of our prefills still ahead of a prompt sent to `address` now."""
        pod = self._pods.get(address)
        return 0.0 if pod is None else max(0.0, pod.done_at - now)

    def score(self, ctx, endpoints):
        now = self.clock()
        if len(self._pods) > MAX_PODS:
            self._forget_idle(now)
        return lower_is_better([self.wait(e.address, now) for e in endpoints])

    def pre_request(self, ctx, result):
        if not result.targets:
            return
        address, now = result.targets[0].address, self.clock()
        pod = self._pods.setdefault(address, _Pod())
        alone = pod.done_at <= now
        per_token = self.fixed if self.fixed is not None else pod.per_token
        if per_token is not None:
            pod.done_at = max(now, pod.done_at) + ctx.request.approx_prompt_tokens * per_token
        self._sent.put(ctx, _Sent(address, alone))

    def post_response(self, ctx, info):
        sent = self._sent.get(ctx)
        if sent is None or not sent.alone or self.fixed is not None:
            return
        if info.ttft is None or info.prompt_tokens is None or not 200 <= (info.status or 0) < 400:
            return
        uncached = info.prompt_tokens - (info.cached_tokens or 0)
        pod = self._pods.get(sent.address)
        if pod is None or uncached < MIN_LEARN_TOKENS:
            return
        sample = info.ttft / uncached
        old = pod.per_token
        pod.per_token = sample if old is None else old + LEARN_WEIGHT * (sample - old)

    def _forget_idle(self, now: float) -> None:
        for address in [a for a, p in self._pods.items() if p.done_at <= now]:
            del self._pods[address]
