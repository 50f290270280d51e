"""session-affinity-scorer: requests with the same x-session-id go back to the same pod.

The scorer gives 1 to the pod that served the session last and 0 to others; as a PreRequest
it remembers the choice for `ttlSeconds` (300) after the session's last request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Annotated

import msgspec

from infergw.epp.scheduling.framework import PreRequest, Scorer
from infergw.epp.scheduling.params import PluginParams, PositiveCount, parse_params

MAX_TTL_SECONDS = 30 * 24 * 3600.0


class SessionAffinityParams(PluginParams):
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_SECONDS)] = 300.0
    max_sessions: PositiveCount = 100_000


class SessionAffinityScorer(Scorer, PreRequest):
    type_name = "session-affinity-scorer"
    params_type = SessionAffinityParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.ttl = p.ttl_seconds
        self.max_sessions = p.max_sessions
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _lookup(self, session: str) -> str | None:
        hit = self._sessions.get(session)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def score(self, ctx, endpoints):
        session = ctx.request.session_id
        address = self._lookup(session) if session else None
        return [1.0 if e.address == address else 0.0 for e in endpoints]

    def pre_request(self, ctx, result):
        session = ctx.request.session_id
        if not session or not result.targets:
            return
        self._sessions[session] = (result.targets[0].address, time.monotonic() + self.ttl)
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
