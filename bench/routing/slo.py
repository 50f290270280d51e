"""Goodput: the requests per second that meet a latency SLO, not merely finish.

A router that balances load well but loses every cache hit, or packs one pod until its
decode crawls, can complete as many requests as another and still fail its users: goodput
counts only answers whose first token came within `ttft_s` and whose later tokens came at
`tpot_s` apart or less on average (TPOT from the streamed answer: the time from the first to
the last token over the tokens in between). A failed request never meets it; an answer of a
single token has no TPOT and is judged by its TTFT alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from infergw.bench.routing.client import Outcome


@dataclass(slots=True, frozen=True)
class Slo:
    ttft_s: float = 1.0
    tpot_s: float = 0.050

    def met_by(self, o: Outcome) -> bool:
        if not o.ok or o.ttft is None or o.ttft > self.ttft_s:
            return False
        return o.tpot is None or o.tpot <= self.tpot_s

    def describe(self) -> dict:
        return {"ttft_ms": round(1000 * self.ttft_s, 1), "tpot_ms": round(1000 * self.tpot_s, 1)}


def goodput(outcomes: Iterable[Outcome], seconds: float, slo: Slo) -> tuple[float, float | None]:
    """(requests per second meeting the SLO, their share of all the requests)."""
    outcomes = list(outcomes)
    met = sum(slo.met_by(o) for o in outcomes)
    return met / seconds, (met / len(outcomes) if outcomes else None)
