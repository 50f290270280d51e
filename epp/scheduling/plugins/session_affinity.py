"""session-affinity-scorer: requests with the same x-session-id go back to the same pod.

The scorer gives 1 to the pod that served the session last and 0 to others; as a PreRequest
it remembers the choice for `ttlSeconds` (300) after the session's last request.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from epp.scheduling.framework import PreRequest, Scorer


class SessionAffinityScorer(Scorer, PreRequest):
    type_name = "session-affinity-scorer"

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.ttl = float(self.params.get("ttlSeconds", 300))
        self.max_sessions = int(self.params.get("maxSessions", 100_000))
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _lookup(self, session: str) -> str | None:
        hit = self._sessions.get(session)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def score(self, req, endpoints):
        address = self._lookup(req.session_id) if req.session_id else None
        return [1.0 if e.address == address else 0.0 for e in endpoints]

    def pre_request(self, req, result):
        if not req.session_id or not result.targets:
            return
        self._sessions[req.session_id] = (result.targets[0].address, time.monotonic() + self.ttl)
        self._sessions.move_to_end(req.session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
