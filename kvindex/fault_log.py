"""Faults in pods' KV events, counted per (pod, kind) and logged at most once per `LOG_EVERY`
seconds each, so that an engine configured unlike the picker (or a hostile one) can neither
fill the log nor hide another pod's first fault behind its own flood.

A line says the pod, the kind, what was wrong with the latest event of that kind, and how many
of them came since the last line. The (pod, kind) pairs remembered are bounded: past
`MAX_KEYS` the oldest is forgotten (its next fault is logged again, as a first).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from infergw.kvindex.unresolved import LOG_EVERY, MAX_PODS

MAX_KEYS = 4 * MAX_PODS  # (pod, kind) pairs: a few kinds of fault per pod


@dataclass(slots=True)
class _Seen:
    total: int = 0
    since_logged: int = 0
    logged_at: float | None = None


class FaultLog:
    def __init__(
        self, logger: logging.Logger, clock=time.monotonic, level: int = logging.WARNING
    ) -> None:
        self._log = logger
        self._level = level
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()

    def note(self, pod: str, kind: str, detail: str) -> bool:
        """Count one fault of `kind` in `pod`'s events; log it unless this (pod, kind) was
        logged less than LOG_EVERY seconds ago. Whether it was logged."""
        key = (pod, kind)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= MAX_KEYS:
                self._seen.popitem(last=False)
            seen = self._seen[key] = _Seen()
        seen.total += 1
        seen.since_logged += 1
        now = self._clock()
        if seen.logged_at is not None and now - seen.logged_at < LOG_EVERY:
            return False
        self._log.log(
            self._level,
            "KV events of %s: %s (%s; %d such since the last line about it, %d in all; "
            "at most one line per %.0f s per pod and kind)",
            pod,
            detail,
            kind,
            seen.since_logged,
            seen.total,
            LOG_EVERY,
        )
        seen.logged_at, seen.since_logged = now, 0
        return True

    def counts(self) -> dict[str, dict[str, int]]:
        """Per pod, its faults by kind (of the pairs still remembered)."""
        out: dict[str, dict[str, int]] = {}
        for (pod, kind), seen in self._seen.items():
            out.setdefault(pod, {})[kind] = seen.total
        return out
